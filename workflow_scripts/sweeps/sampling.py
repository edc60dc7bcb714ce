"""Sweep points drawn at random from a space (`sweep.samples`), deterministic for a seed.

    sweep:
      samples:
        n: 200
        seed: 0
        space:
          training.learning_rate: {log_range: [1.0e-5, 1.0e-2]}
          peft.r: {choice: [4, 8, 16, 32]}
          peft.lora_alpha: {range: [8, 64], int: true}

Point i takes the i-th group of draws of one `random.Random(seed)`, one draw per key in the
order the space is written, and only through `Random.random()`, whose sequence for a seed
Python keeps the same across versions. So the first points of `n: 200` are the points of
`n: 100`, raising n only adds points, and each point is named from its values like a grid point
(never renamed). Floats are rounded to 4 significant digits, so the folder name shows the exact
value trained with. A draw equal to an earlier point (of the grid, the explicit points or the
samples) is skipped and drawn again.

Pure Python (no Snakemake): points.point_overrides calls it at load time.
"""

import json
import math
import random

from workflow_scripts.errors import ConfigError

KINDS = ("range", "log_range", "choice")
# Sampling stops with an error after this many draws per asked point: a space with fewer
# distinct points than n (a few choices, narrow integer ranges) would otherwise never finish.
MAX_DRAWS_PER_POINT = 100
SIGNIFICANT_DIGITS = 4


def _check_spec(key: str, spec: dict, sweepable: tuple[str, ...]) -> tuple[str, list, bool]:
    where = f"sweep.samples.space.{key}"
    if key.split(".")[0] not in sweepable or "." not in key:
        raise ConfigError(f"{where}: not a key of {', '.join(sweepable)} (write section.key)")
    kinds = [k for k in KINDS if k in spec]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of {', '.join(KINDS)} (got {kinds or 'none'})")
    kind = kinds[0]
    values = spec[kind]
    as_int = spec["int"]
    if kind == "choice":
        if as_int:
            raise ConfigError(f"{where}: `int` applies to range and log_range, not choice")
        return kind, values, as_int
    lo, hi = values
    if lo > hi:
        raise ConfigError(f"{where}.{kind}: low {lo} > high {hi}")
    if kind == "log_range" and lo <= 0:
        raise ConfigError(f"{where}.log_range: low {lo} must be > 0 (a log scale has no 0)")
    if as_int and (lo != int(lo) or hi != int(hi)):
        raise ConfigError(f"{where}.{kind}: with `int: true` both ends must be integers (got {lo}, {hi})")
    return kind, values, as_int


def _round(x: float) -> float:
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def draw(kind: str, values: list, as_int: bool, u: float):
    """The value at u in [0, 1) of one dimension."""
    if kind == "choice":
        return values[min(int(u * len(values)), len(values) - 1)]
    lo, hi = values
    if as_int:
        lo, hi = int(lo), int(hi)
        if kind == "range":
            return lo + min(int(u * (hi - lo + 1)), hi - lo)
        # the integers of [lo, hi], each as likely as the log-width of its half-unit cell
        a, b = math.log(lo - 0.5), math.log(hi + 0.5)  # lo >= 1 here
        return min(max(round(math.exp(a + u * (b - a))), lo), hi)
    if kind == "range":
        x = lo + u * (hi - lo)
    else:
        x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    return min(max(_round(x), lo), hi)


def sample_points(samples: dict, sweepable: tuple[str, ...], taken: list[dict] = ()) -> list[dict]:
    """`samples["n"]` distinct points (dotted key -> value), none equal to a point of ``taken``."""
    specs = [(key, *_check_spec(key, spec, sweepable)) for key, spec in samples["space"].items()]
    n = samples["n"]
    rng = random.Random(samples["seed"])
    seen = {json.dumps(p, sort_keys=True) for p in taken}
    points: list[dict] = []
    for _ in range(MAX_DRAWS_PER_POINT * n):
        point = {key: draw(kind, values, as_int, rng.random()) for key, kind, values, as_int in specs}
        text = json.dumps(point, sort_keys=True)
        if text not in seen:
            seen.add(text)
            points.append(point)
            if len(points) == n:
                return points
    raise ConfigError(
        f"sweep.samples.n: {n} distinct points asked, the space gave only {len(points)} in "
        f"{MAX_DRAWS_PER_POINT * n} draws: lower n or widen sweep.samples.space"
    )
