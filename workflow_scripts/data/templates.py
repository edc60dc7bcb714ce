"""Message templates (`messages_format`): `{name}` placeholders filled literally, `{{`/`}}` literal braces."""

import string


class TemplateError(ValueError):
    """A malformed template; the message names where it is written."""


def template_fields(template: str, where: str) -> list[str]:
    """Placeholder names of a template; `{{`/`}}` are literal braces."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TemplateError(
            f"{where}: malformed template {template!r} ({exc}); write literal braces as {{{{ }}}}"
        ) from None
    names = []
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if spec or conv or not name.isidentifier():
            raise TemplateError(f"{where}: placeholder {{{name}}} must be a plain name (no format spec)")
        names.append(name)
    return names


def render_template(template: str, values: dict[str, str]) -> str:
    """Insert values literally: braces inside the data are never interpreted."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            out.append(values[name])
    return "".join(out)
