"""Values of passed-through TRL SFTConfig / PEFT LoraConfig keys are checked at load, without TRL."""

import json
import subprocess
import sys

import pytest
from helpers import REPO

from workflow_scripts import trainer_fields
from workflow_scripts.checks import check_trainer_section
from workflow_scripts.errors import ConfigError
from workflow_scripts.trainer_fields import OWN_KEYS, allowed_keys, max_steps_problem, problems


def check(section: str, **values) -> None:
    check_trainer_section(section, values)


def test_json_matches_installed_libraries():
    """trainer_keys.json is what config loading checks against; it must follow TRL/PEFT upgrades."""
    computed = trainer_fields.compute()
    hint = "run: python -m workflow_scripts.trainer_fields --write"
    assert json.loads(trainer_fields.KEYS_FILE.read_text()) == computed, hint
    assert trainer_fields.KEYS_FILE.read_text() == trainer_fields.dumps(computed), hint


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_recorded_choices_are_the_ones_the_libraries_enforce():
    """An enum spec must not refuse what the library accepts: the library refuses what is outside it."""
    from peft import LoraConfig
    from trl import SFTConfig

    specs = trainer_fields.load()
    enum_fields = sorted(k for k, s in specs["training"].items() if s != "any" and "enum" in s)
    assert {"lr_scheduler_type", "optim", "eval_strategy", "save_strategy"} <= set(enum_fields)
    base = {"output_dir": "unused", "use_cpu": True, "bf16": False}
    for field in enum_fields:
        SFTConfig(**base, **{field: specs["training"][field]["enum"][0]})
        with pytest.raises(ValueError, match="not-a-choice"):
            SFTConfig(**base, **{field: "not-a-choice"})
    with pytest.raises(ValueError, match="not-a-choice"):
        LoraConfig(task_type="not-a-choice")


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        (
            "training",
            "warmup_steps",
            "lots",
            "training.warmup_steps: expected a number, got the string 'lots'",
        ),
        (
            "training",
            "lr_scheduler_type",
            42,
            "training.lr_scheduler_type: 42 is not one of linear, cosine, ",
        ),
        ("training", "lr_scheduler_type", "cosin", "'cosin' is not one of linear, .*; did you mean cosine"),
        (
            "peft",
            "use_rslora",
            "maybe",
            r"peft.use_rslora: expected a boolean \(true/false\), got the string 'maybe'",
        ),
        # Strings are not coerced here: coercion of command-line values happens elsewhere.
        ("peft", "use_rslora", "true", "peft.use_rslora: expected a boolean .*, got the string 'true'"),
        (
            "training",
            "learning_rate",
            "1e-3",
            "training.learning_rate: expected a number, got the string '1e-3'",
        ),
        # Booleans are not integers; floats are not integers.
        ("training", "seed", True, "training.seed: expected an integer, got true"),
        ("training", "per_device_train_batch_size", 4.5, "expected an integer, got 4.5"),
        ("training", "warmup_steps", None, "training.warmup_steps: expected a number, got null"),
        ("training", "report_to", ["wandb", 3], r"training.report_to\[1\]: expected a string, got 3"),
        ("training", "eval_strategy", False, "false is not one of no, steps, epoch .*quote the word"),
        ("peft", "target_modules", 5, "peft.target_modules: expected a list or null or a string, got 5"),
        ("peft", "bias", "some", "peft.bias: 'some' is not one of none, all, lora_only"),
        ("peft", "task_type", "LM", "peft.task_type: 'LM' is not one of SEQ_CLS, .*CAUSAL_LM"),
        ("peft", "lora_dropout", "0.1", "peft.lora_dropout: expected a number, got the string '0.1'"),
    ],
)
def test_bad_values_are_refused_naming_the_key(section, key, value, message):
    with pytest.raises(ConfigError, match=message):
        check(section, **{key: value})


def default_sections() -> dict:
    """The training / peft sections the demo runs with (config.yaml over the schema's defaults)."""
    from workflow_scripts.config import load_and_resolve

    config = load_and_resolve(REPO / "config.yaml")
    return {s: {k: v for k, v in config[s].items() if k not in OWN_KEYS[s]} for s in ("training", "peft")}


def test_default_config_values_pass():
    sections = default_sections()
    assert {"lr_scheduler_type", "max_steps", "report_to"} <= set(sections["training"])
    for section, values in sections.items():
        assert set(values) <= allowed_keys()[section]
        assert problems(section, values) == []


@pytest.mark.parametrize(
    "section, values",
    [
        ("training", {"lr_scheduler_type": "cosine", "optim": "adamw_torch", "eval_strategy": "no"}),
        ("training", {"report_to": ["wandb"]}),
        ("training", {"report_to": "none", "warmup_steps": 0.1, "learning_rate": 1, "num_train_epochs": 2}),
        ("training", {"report_to": [], "max_length": None, "eval_steps": 45, "bf16": None}),
        ("training", {"debug": ["underflow_overflow"], "lr_scheduler_kwargs": {"min_lr": 0.0}}),
        ("training", {"parallelism_config": object()}),  # recorded as "any": left to TRL
        ("peft", {"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "r": 8}),
        ("peft", {"target_modules": "all-linear", "init_lora_weights": "pissa_niter_4", "task_type": None}),
        ("peft", {"task_type": "CAUSAL_LM", "bias": "none", "init_lora_weights": False}),
        ("peft", {"file": 42}),  # snaketune's own keys are not checked here
    ],
)
def test_good_values_pass(section, values):
    assert problems(section, values) == []


@pytest.mark.parametrize("steps", [0, -7, -2])
def test_max_steps_zero_or_negative_is_refused(steps):
    with pytest.raises(ConfigError, match=rf"training.max_steps: must be a positive .*got {steps}"):
        check("training", max_steps=steps)
    assert max_steps_problem({"max_steps": steps}).startswith("training.max_steps: must be a positive")


@pytest.mark.parametrize("training", [{"max_steps": -1}, {"max_steps": 90}, {}])
def test_max_steps_positive_unset_or_absent_passes(training):
    assert problems("training", training) == []


def test_spec_derivation():
    from typing import Literal

    spec = trainer_fields.spec_of
    assert spec(int) == {"types": ["integer"]}
    assert spec(float | None) == {"types": ["null", "number"]}
    assert spec(str | list[str] | None) == {
        "items": {"types": ["string"]},
        "types": ["array", "null", "string"],
    }
    assert spec(dict[str, int] | str) == {"types": ["object", "string"]}
    assert spec(Literal["a", "b"]) == {"enum": ["a", "b"], "types": ["string"]}
    assert spec(Literal["a", "b"] | str) == {"types": ["string"]}  # plain str widens a Literal
    assert spec(list[tuple[int, int]]) == {"types": ["array"]}  # item type too complex: unchecked
    assert spec(tuple[int, int]) == "any"


def test_loading_is_fast_and_does_not_import_trl():
    code = (
        "import sys, time, yaml\n"
        "t = time.perf_counter()\n"
        "from workflow_scripts.trainer_fields import allowed_keys, problems\n"
        "from workflow_scripts.config import load_schema\n"
        "config = yaml.safe_load(open('config.yaml'))\n"
        "keys = allowed_keys()\n"
        "for s in ('training', 'peft'):\n"
        "    # config.yaml's values over the schema's defaults, as the demo runs them\n"
        "    props = load_schema()['properties'][s]['properties']\n"
        "    values = {k: v['default'] for k, v in props.items() if 'default' in v}\n"
        "    values.update(config.get(s) or {})\n"
        "    assert not problems(s, values)\n"
        "print(time.perf_counter() - t)\n"
        "heavy = {'trl', 'torch', 'peft', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    seconds = float(out.stdout)
    print(f"import + allowed_keys() + problems() on the default config: {seconds * 1000:.1f} ms")
    assert seconds < 1.0
