"""One default per config key: the schema's, with its reason beside it.

config.yaml (the demo, always loaded) may only hold the demo's own choices, each marked with a
`# demo:` comment saying why it differs from the default; code reads a default from the schema
(`config.schema_default`) instead of restating it.
"""

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from workflow_scripts.config import load_schema, schema_default

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config.yaml"
DEMO_MARK = "# demo:"
# Code names of config keys whose names differ from the key's.
CODE_ALIASES = {
    "pack": "training.fast_path.packing",
    "mode": "evaluation.answer_match",
    "rel_tol": "evaluation.answer_tolerance",
}
# (function or class, name) that share a config key's name but are something else.
HOMONYMS = {
    ("_compute", "batch_size"): "BERTScore's scoring batch (evaluation.batch_size is generation's)",
    ("Job", "threads"): "a Job built by hand (tests, benchmarks); a rule's come from resources.threads",
}


def schema_keys() -> dict[str, list[tuple[str, dict]]]:
    """Leaf name -> [(dotted key, schema node)] for every key of the schema."""
    out: dict[str, list[tuple[str, dict]]] = {}

    def walk(node: dict, prefix: str) -> None:
        for name, sub in (node.get("properties") or {}).items():
            out.setdefault(name, []).append((prefix + name, sub))
            if isinstance(sub, dict):
                walk(sub, f"{prefix}{name}.")

    walk(load_schema(), "")
    return out


def node_at(key: str) -> dict | None:
    node = load_schema()
    for part in key.split("."):
        node = (node.get("properties") or {}).get(part)
        if node is None:
            return None
    return node


def config_leaves(node, prefix="", covered=False, lines=()):
    """(dotted key, value, marked) for every leaf of config.yaml, from its YAML nodes."""
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}"
        marked = covered if node.flow_style else covered or has_demo_mark(lines, key_node)
        if isinstance(value_node, yaml.MappingNode):
            yield from config_leaves(value_node, f"{key}.", marked, lines)
        else:
            yield key, yaml.safe_load(yaml.serialize(value_node)), marked


def has_demo_mark(lines: list[str], key_node) -> bool:
    """A `# demo:` comment on the key's line, or in the comment block above it or above an earlier
    sibling of the same block (no blank line between)."""
    row, column = key_node.start_mark.line, key_node.start_mark.column
    if DEMO_MARK in lines[row]:
        return True
    for line in reversed(lines[:row]):
        stripped = line.strip()
        if not stripped:
            return False
        if stripped.startswith("#"):
            if stripped.startswith(DEMO_MARK):
                return True
            continue
        if len(line) - len(line.lstrip()) < column:
            return False  # the parent key: its own mark was inherited by the caller
    return False


def demo_choices() -> list[tuple[str, object, bool]]:
    text = CONFIG.read_text()
    return list(config_leaves(yaml.compose(text), lines=text.splitlines()))


def test_config_yaml_marks_every_value_as_a_demo_choice():
    unmarked = [key for key, _, marked in demo_choices() if not marked]
    assert not unmarked, (
        f"config.yaml sets {unmarked} without a `{DEMO_MARK} <why>` comment: a value there is the "
        "demo's choice, and says why it differs from the default in schemas/config.schema.yaml"
    )


def _restated(value: dict, schema: dict, prefix: str = "") -> list[str]:
    out = []
    for name, v in value.items():
        node = (schema.get("properties") or {}).get(name)
        if not isinstance(node, dict):
            continue
        if "default" in node and node["default"] == v:  # a leaf, or a mapping defaulted as a whole
            out.append(prefix + name)
        elif isinstance(v, dict) and node.get("properties"):
            out += _restated(v, node, f"{prefix}{name}.")
    return out


def test_config_yaml_restates_no_schema_default():
    restated = _restated(yaml.safe_load(CONFIG.read_text()), load_schema())
    assert not restated, f"config.yaml restates the schema's default of {restated}: delete them there"


def test_config_yaml_restates_no_trl_or_peft_default():
    """TRL / PEFT fields the schema does not list keep the library's default: config.yaml must not
    repeat it."""
    from peft import LoraConfig
    from trl import SFTConfig

    libraries = {"training": SFTConfig, "peft": LoraConfig}
    restated = []
    for key, value, _ in demo_choices():
        section, _, name = key.partition(".")
        if section not in libraries or node_at(key) is not None or "." in name:
            continue
        fields = {f.name: f for f in dataclasses.fields(libraries[section])}
        if name in fields and fields[name].default == value:
            restated.append(key)
    assert not restated, f"config.yaml restates the library default of {restated}: delete them there"


def test_every_schema_default_gives_its_reason():
    missing = [
        key
        for entries in schema_keys().values()
        for key, node in entries
        if isinstance(node, dict) and "default" in node and not str(node.get("description", "")).strip()
    ]
    assert not missing, f"schema keys with a default but no description (say why): {missing}"


def test_schema_default_reads_the_schema():
    assert schema_default("evaluation.max_new_tokens") == node_at("evaluation.max_new_tokens")["default"]
    assert schema_default("model.fallback_chat_template") is None  # unset: the family's own
    with pytest.raises(KeyError, match="sweep.name: has no default"):
        schema_default("sweep.name")
    with pytest.raises(KeyError, match="not a key"):
        schema_default("evaluation.no_such_key")


def _literal(node):
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return False, None
    return value not in (None, "", {}, [], ()), value


def _defaults_in(tree: ast.AST):
    """(owner, name, default node, line) for parameters, dataclass-style fields, module constants
    and `.get(name, default)` / `.setdefault(name, default)` calls."""
    owners = {}
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            owners[child] = parent
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            positional = a.posonlyargs + a.args
            pairs = list(zip(positional[len(positional) - len(a.defaults) :], a.defaults, strict=True))
            pairs += [(k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None]
            for arg, default in pairs:
                yield node.name, arg.arg, default, node.lineno
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            owner = owners.get(node)
            yield getattr(owner, "name", ""), node.target.id, node.value, node.lineno
        elif (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ):
            yield "", node.targets[0].id, node.value, node.lineno
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "setdefault")
            and len(node.args) == 2
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield "", node.args[0].value, node.args[1], node.lineno


def _restated_defaults(root: Path) -> list[str]:
    keys = schema_keys()
    for alias, key in CODE_ALIASES.items():
        keys.setdefault(alias, []).append((key, node_at(key)))
    # distinctive default values (strings, fractions): a literal equal to one restates it
    distinctive = {}
    for entries in keys.values():
        for key, node in entries:
            d = node.get("default") if isinstance(node, dict) else None
            if (isinstance(d, str) and d) or (isinstance(d, float) and d not in (0.0, 1.0)):
                distinctive.setdefault(d, key)
    found = []
    for path in sorted((root / "workflow_scripts").rglob("*.py")):
        for owner, name, default, line in _defaults_in(ast.parse(path.read_text())):
            ok, value = _literal(default)
            if not ok or (owner, name) in HOMONYMS:
                continue
            named = sorted(  # the key whose default this is first
                (node["default"] != value, key)
                for key, node in keys.get(name, [])
                if isinstance(node, dict) and "default" in node and type(value) is type(node["default"])
            )
            named = [key for _, key in named]
            by_value = (
                distinctive.get(value)
                if isinstance(value, str | float) and not isinstance(value, bool)
                else None
            )
            if named or by_value or name.startswith("DEFAULT_"):
                what = named[0] if named else by_value or "a default"
                found.append(f"{path.relative_to(root)}:{line} {name}={value!r} (restates {what})")
    get_re = re.compile(r"""\.(?:get|setdefault)\(\s*["'](\w+)["']\s*,\s*([^)\s][^)]*)\)""")
    for path in [root / "Snakefile", *sorted((root / "rules").glob("*.smk"))]:
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            for name, default in get_re.findall(line):
                if name in keys and default.strip() not in ("None", "{}", "[]", '""', "''"):
                    found.append(f"{path.relative_to(root)}:{line_no} .get({name!r}, {default.strip()})")
    return found


def test_code_reads_defaults_instead_of_restating_them():
    found = _restated_defaults(REPO)
    assert not found, (
        "code restates config defaults (read them from the resolved config, or with "
        "workflow_scripts.config.schema_default):\n" + "\n".join(found)
    )


def test_the_code_scan_finds_a_restated_default(tmp_path):
    """The scan is not vacuous: each kind of restatement is caught."""
    (tmp_path / "workflow_scripts").mkdir()
    (tmp_path / "rules").mkdir()
    (tmp_path / "Snakefile").write_text("")
    (tmp_path / "rules" / "x.smk").write_text('n = config["evaluation"].get("batch_size", 16)\n')
    (tmp_path / "workflow_scripts" / "x.py").write_text(
        "DEFAULT_MAX_NEW_TOKENS = 512\n"
        "def judge(p, r, mode='precision', rel_tol=0.01): ...\n"
        "def collate(ids, pack=False): ...\n"
        "class Decoding:\n    top_p: float = 1.0\n"
        "seed = cfg.get('seed', 0)\n"
    )
    found = "\n".join(_restated_defaults(tmp_path))
    for expected in (
        "DEFAULT_MAX_NEW_TOKENS=512",
        "mode='precision' (restates evaluation.answer_match)",
        "rel_tol=0.01 (restates evaluation.answer_tolerance)",
        "pack=False (restates training.fast_path.packing)",
        "top_p=1.0 (restates evaluation.top_p)",
        "seed=0",
        "x.smk:1 .get('batch_size', 16)",
    ):
        assert expected in found, (expected, found)
