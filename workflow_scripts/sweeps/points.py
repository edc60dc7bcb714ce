"""A sweep's points: the grid's product, the explicit points, the sampled ones (sampling.py), their
names, and each point as an experiment of its own, resolved and validated with the full schema at
load time. Without a `sweep` section the config is one experiment (named by `experiment`).

A point's name depends only on its own keys and values, so adding or removing other points never
renames it and its finished jobs are kept.
"""

import copy
import difflib
import itertools
import json

from workflow_scripts import layout
from workflow_scripts.config import revalidate
from workflow_scripts.errors import ConfigError
from workflow_scripts.layout import Experiment, shorten, slug
from workflow_scripts.sweeps.plan import check_halving, sweep_base
from workflow_scripts.sweeps.sampling import sample_points

# One value in a sweep point's name (longer ones end in a hash of the whole value), and the whole
# name (a path component holds 255 bytes; layout.COMPONENT_MAX_CHARS leaves room for temporaries).
POINT_VALUE_CHARS = 40
POINT_NAME_CHARS = 150
# Sections a sweep may vary (the rest describe where and how jobs run, not the experiment).
SWEEPABLE = ("training", "peft", "model", "messages_format", "filters", "evaluation", "dataset")


def _set_dotted(config: dict, dotted: str, value, where: str) -> None:
    parts = dotted.split(".")
    if parts[0] not in SWEEPABLE or len(parts) < 2:
        raise ConfigError(f"{where}: {dotted!r} is not a key of {', '.join(SWEEPABLE)} (write section.key)")
    node = config
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])} is not a mapping, cannot set {dotted}")
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)


def _value_text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key, or more parts where the last one is ambiguous."""
    names = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            short = "_".join(parts[-n:])
            if sum(1 for other in keys if "_".join(other.split(".")[-n:]) == short) == 1:
                break
        names[k] = short
    return names


def point_overrides(sweep: dict) -> list[dict]:
    """The grid's Cartesian product (in the order written), the explicit points, then the
    sampled ones (sampling.py)."""
    grid = sweep.get("grid") or {}
    combos = (
        [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())] if grid else []
    )
    written = combos + [dict(p) for p in sweep.get("points") or []]
    samples = sample_points(sweep["samples"], SWEEPABLE, written) if sweep.get("samples") else []
    return written + samples


def point_names(overrides: list[dict]) -> list[str]:
    """Readable, unique, path- and job-name-safe names: each point by the keys it sets itself.

    Built with snakemake.utils.Paramspace (`key~value` joined by `_`). A point's name depends
    only on its own keys and values, so adding or removing other points (or a grid value) never
    renames it, and its finished jobs are kept.
    """
    import pandas as pd
    from snakemake.utils import Paramspace

    short = _short_names(list(dict.fromkeys(k for o in overrides for k in o)))
    names = []
    for o in overrides:
        row = pd.DataFrame(
            [
                {
                    short[k]: shorten(slug(_value_text(v)), POINT_VALUE_CHARS, _value_text(v))
                    for k, v in o.items()
                }
            ]
        )
        name = next(iter(Paramspace(row, filename_params="*").instance_patterns))
        names.append(shorten(name, POINT_NAME_CHARS))
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise ConfigError(
                f"sweep: points {seen[n]} and {i} are both named {n!r}: the same values (a point "
                "repeated), or values that differ only in characters a folder name cannot hold"
            )
        seen[n] = i
    return names


def expand(config: dict) -> list[Experiment]:
    """The experiments of a resolved config: one, or one per sweep point (each validated)."""
    sweep = config.get("sweep")
    if not sweep:
        name = layout.check_safe_name(config["experiment"], "experiment")
        return [layout.locate(name, config)]
    sweep_name = layout.check_safe_name(sweep["name"], "sweep.name")
    overrides = point_overrides(sweep)
    if not overrides:
        raise ConfigError("sweep: none of `grid`, `points`, `samples` gives a point")
    names = point_names(overrides)
    if sweep["strategy"] == "halving":
        check_halving(sweep, config["training"], overrides)
    elif sweep.get("halving"):
        raise ConfigError(
            "sweep.halving: set, but sweep.strategy is grid (set strategy: halving, or drop it)"
        )
    check_act_on(sweep, names)
    base = sweep_base(config)
    experiments = []
    for i, (name, values) in enumerate(zip(names, overrides, strict=True)):
        where = f"sweep point {i} ({name})"
        point = copy.deepcopy(base)
        for dotted, value in values.items():
            _set_dotted(point, dotted, value, where)
        try:
            revalidate(point)
            experiments.append(layout.locate(layout.point_experiment(sweep_name, name), point))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return experiments


def check_act_on(sweep: dict, names: list[str]) -> None:
    """`sweep.act_on` is `best` or one of the points (short or full name)."""
    act_on = sweep["act_on"]
    if (
        act_on == "best"
        or act_on in names
        or act_on in (layout.point_experiment(sweep["name"], n) for n in names)
    ):
        return
    close = difflib.get_close_matches(act_on.rsplit("/", 1)[-1], names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; the points: {', '.join(names[:5])}"
    raise ConfigError(
        f"sweep.act_on: {act_on!r} is neither `best` nor a point of sweep {sweep['name']!r}{hint}"
    )
