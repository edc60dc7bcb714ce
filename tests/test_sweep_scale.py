"""Large sweeps: sampled points (sweep.samples) and the name shapes Snakemake plans with."""

import re

import pytest

from workflow_scripts.errors import ConfigError
from workflow_scripts.layout import SHARED_FOLDER_RE, experiment_name_re
from workflow_scripts.sweeps.points import SWEEPABLE, expand
from workflow_scripts.sweeps.sampling import sample_points

SPACE = {
    "training.learning_rate": {"log_range": [1e-5, 1e-2], "int": False},
    "peft.r": {"choice": [4, 8, 16], "int": False},
    "peft.lora_alpha": {"range": [8, 64], "int": True},
    "peft.lora_dropout": {"range": [0.0, 0.2], "int": False},
}


def samples(n, seed=0, space=None):
    return {"n": n, "seed": seed, "space": space or SPACE}


def test_samples_are_deterministic_and_growing_n_only_adds_points():
    first = sample_points(samples(20), SWEEPABLE)
    assert first == sample_points(samples(20), SWEEPABLE)
    assert sample_points(samples(50), SWEEPABLE)[:20] == first
    assert sample_points(samples(20, seed=1), SWEEPABLE) != first
    assert len({tuple(sorted(p.items())) for p in first}) == 20


def test_sampled_values_stay_in_their_space():
    points = sample_points(samples(300), SWEEPABLE)
    lrs = [p["training.learning_rate"] for p in points]
    assert all(1e-5 <= x <= 1e-2 for x in lrs)
    # log-uniform: about as many points in each decade
    per_decade = [sum(10**-e <= x < 10 ** -(e - 1) for x in lrs) for e in (5, 4, 3)]
    assert min(per_decade) > 60, per_decade
    assert {p["peft.r"] for p in points} == {4, 8, 16}
    alphas = [p["peft.lora_alpha"] for p in points]
    assert all(isinstance(a, int) and 8 <= a <= 64 for a in alphas) and {8, 64} <= set(alphas)
    for x in lrs + [p["peft.lora_dropout"] for p in points]:
        assert x == float(f"{x:.4g}"), "floats keep 4 significant digits: the name shows the exact value"


def test_integer_log_range_covers_both_ends():
    space = {"training.seed": {"log_range": [1, 1000], "int": True}}
    values = [p["training.seed"] for p in sample_points(samples(50, space=space), SWEEPABLE)]
    assert min(values) == 1 and max(values) <= 1000 and all(isinstance(v, int) for v in values)
    assert sorted(values)[25] < 200, "log scale: the median is far below a uniform draw's 500"


def test_a_draw_equal_to_a_written_point_is_drawn_again():
    space = {"peft.r": {"choice": [4, 8, 16], "int": False}}
    points = sample_points(samples(2, space=space), SWEEPABLE, taken=[{"peft.r": 8}])
    assert sorted(p["peft.r"] for p in points) == [4, 16]
    with pytest.raises(ConfigError, match=r"sweep.samples.n: 3 distinct points asked, the space gave only 2"):
        sample_points(samples(3, space=space), SWEEPABLE, taken=[{"peft.r": 8}])


def test_sampled_points_are_named_from_their_values_and_never_renamed(resolved_config):
    def names(n):
        sweep = {"name": "s", "grid": {"peft.r": [4]}, "samples": {"n": n, "space": SPACE}}
        return [e.name for e in expand(resolved_config({"sweep": sweep}))]

    few, more = names(3), names(6)
    assert more[:4] == few and len(set(more)) == 7
    assert few[0] == "sweeps/s/r~4"
    assert re.fullmatch(
        r"sweeps/s/learning_rate~[0-9.e-]+_r~\d+_lora_alpha~\d+_lora_dropout~[0-9.e-]+", few[1]
    )


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        ({"n": 0, "space": SPACE}, r"config key sweep.samples.n: 0 is less than the minimum of 1"),
        ({"n": 2}, r"config key sweep.samples: 'space' is a required property"),
        ({"n": 2, "space": {}}, r"config key sweep.samples.space: \{\} should be non-empty"),
        (
            {"n": 2, "space": {"training.learning_rate": {"range": [0.1, 0.01]}}},
            r"sweep.samples.space.training.learning_rate.range: low 0.1 > high 0.01",
        ),
        (
            {"n": 2, "space": {"training.learning_rate": {"log_range": [0, 0.01]}}},
            r"sweep.samples.space.training.learning_rate.log_range: low 0 must be > 0",
        ),
        (
            {"n": 2, "space": {"peft.r": {"range": [1, 4], "choice": [4]}}},
            r"sweep.samples.space.peft.r: give exactly one of range, log_range, choice",
        ),
        (
            {"n": 2, "space": {"peft.r": {}}},
            r"sweep.samples.space.peft.r: give exactly one of .* \(got none\)",
        ),
        (
            {"n": 2, "space": {"peft.r": {"range": [1.5, 4], "int": True}}},
            r"sweep.samples.space.peft.r.range: with `int: true` both ends must be integers",
        ),
        (
            {"n": 2, "space": {"resources.threads": {"range": [1, 4], "int": True}}},
            r"sweep.samples.space.resources.threads: not a key of training",
        ),
        (
            {"n": 2, "space": {"peft.r": {"range": [1, 4], "step": 1}}},
            r"config key sweep.samples.space.peft.r.step: unknown key",
        ),
    ],
)
def test_bad_samples_are_one_line_naming_the_key(resolved_config, sample, message):
    with pytest.raises(ConfigError, match=message) as err:
        expand(resolved_config({"sweep": {"name": "s", "samples": sample}}))
    assert "\n" not in str(err.value)


def test_wildcard_shapes_match_every_name_without_listing_them(resolved_config):
    """The Snakefile constrains wildcards by these shapes (an alternation of every point name made
    planning grow faster than the points): every name and shared folder must match them."""
    sweep = {"name": "s", "grid": {"training.max_length": [256, 512]}, "samples": {"n": 5, "space": SPACE}}
    for cfg in (resolved_config(), resolved_config({"sweep": sweep})):
        experiments = expand(cfg)
        for e in experiments:
            assert re.fullmatch(experiment_name_re(cfg), e.name), e.name
            for folder in (e.data, e.preprocessed, e.base_model, e.formatted, e.base_eval):
                assert re.fullmatch(SHARED_FOLDER_RE, folder.rsplit("/", 1)[1]), folder
    assert not re.fullmatch(experiment_name_re(cfg), "sweeps/s/a/b")
    assert not re.fullmatch(experiment_name_re(cfg), "sweeps/other/r~4")
    assert len(experiments) == 2 + 5
