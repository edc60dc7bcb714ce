"""Config validation: every bad key is refused by name before any job runs."""

import pytest
import yaml
from helpers import REPO

from workflow_scripts.checks import template_fields
from workflow_scripts.config import load_and_resolve
from workflow_scripts.data import templates
from workflow_scripts.data.templates import TemplateError, render_template
from workflow_scripts.errors import ConfigError


def test_default_config_resolves_with_defaults_filled(resolved_config):
    cfg = resolved_config()
    assert cfg["model"]["id"] == "embedded:smollm2-135m-instruct"
    assert cfg["evaluation"]["answer_tolerance"] == 0.01
    assert cfg["training"]["fast_path"]["labels_only_logits"] is True
    assert cfg["resources"]["mem_mb"]["train"] > 0


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"peft": {"r": "sixteen"}}, "peft.r"),
        ({"peft": {"r": 0}}, "peft.r"),
        ({"training": {"learning_rate": -1}}, "training.learning_rate"),
        ({"trainig": {}}, "trainig"),
        ({"training": {"learnig_rate": 0.1}}, "training.learnig_rate"),
        ({"peft": {"rank": 8}}, "peft.rank"),
        ({"evaluation": {"max_new_tokens": 0}}, "evaluation.max_new_tokens"),
        (
            {"dataset": {"id": "x.jsonl", "split": {"train": 0.5, "validation": 0.1, "test": 0.1}}},
            "dataset.split",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_key(resolved_config, overrides, key):
    with pytest.raises(ConfigError) as err:
        resolved_config(overrides)
    assert key in str(err.value)


def test_unknown_training_key_suggests_the_right_name(resolved_config):
    with pytest.raises(ConfigError, match="did you mean learning_rate"):
        resolved_config({"training": {"learnig_rate": 0.1}})


def test_unknown_placeholder_is_named_with_the_defined_names(resolved_config):
    mf = yaml.safe_load((REPO / "config.yaml").read_text())["messages_format"]
    mf["messages_format"]["messages"][1]["content"] = "{questoin}"
    with pytest.raises(ConfigError, match=r"\{questoin\}.*cot, question, response, system_prompt"):
        resolved_config({"messages_format": mf})


def test_section_file_keys_are_merged_and_validated(tmp_path, resolved_config):
    train_file = tmp_path / "train_config.yaml"
    train_file.write_text("learning_rate: 0.0005\nnum_train_epochs: 2\n")
    cfg = resolved_config({"training": {"file": str(train_file)}})
    assert cfg["training"]["learning_rate"] == 0.0005
    bad = tmp_path / "peft_config.yaml"
    bad.write_text("r: many\n")
    with pytest.raises(ConfigError, match="peft.r"):
        resolved_config({"peft": {"file": str(bad)}})
    with pytest.raises(ConfigError, match="does_not_exist.yaml"):
        resolved_config({"peft": {"file": str(tmp_path / "does_not_exist.yaml")}})


def test_seed_messages_format_file(tmp_path, resolved_config):
    seed_file = tmp_path / "my_messages_format.yaml"
    seed_file.write_text(
        yaml.safe_dump(
            {
                "training_columns": {"q": "Question", "a": "Answer"},
                "messages_format": {
                    "messages": [{"role": "user", "content": "{q}"}, {"role": "assistant", "content": "{a}"}]
                },
                "evaluate_columns": {"query": "Question", "response": "Answer"},
            }
        )
    )
    # the file's columns replace the default's; the default's filters (which name the default's
    # placeholders) are dropped, and the user's own filters are kept
    cfg = resolved_config({"messages_format": {"file": str(seed_file)}})
    assert cfg["messages_format"]["training_columns"] == {"a": "Answer", "q": "Question"}
    assert cfg["filters"]["min_chars"] == {} and cfg["filters"]["max_chars"] == {}
    filters = {"min_chars": {"q": 5}}
    cfg = resolved_config({"messages_format": {"file": str(seed_file)}, "filters": filters})
    assert cfg["filters"]["min_chars"] == {"q": 5}
    with pytest.raises(ConfigError, match="filters.min_chars.question: not a placeholder name; names: a, q"):
        resolved_config(
            {"messages_format": {"file": str(seed_file)}, "filters": {"min_chars": {"question": 3}}}
        )


def test_env_overrides_model_and_dataset(monkeypatch, resolved_config, sample_jsonl):
    monkeypatch.setenv("MODEL_ID", "some/model")
    monkeypatch.setenv("DATASET", str(sample_jsonl))
    cfg = resolved_config()
    assert cfg["model"]["id"] == "some/model"
    assert cfg["dataset"]["id"] == str(sample_jsonl)
    monkeypatch.setenv("DATASET", "data/other.jsonl")  # a missing local file fails at load
    with pytest.raises(ConfigError, match="dataset.id: local path data/other.jsonl does not exist"):
        resolved_config()


def test_dotenv_file_is_loaded(tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("MODEL_ID", raising=False)
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (tmp_path / ".env").write_text("MODEL_ID=from/dotenv\n")
    try:
        cfg = load_and_resolve(tmp_path / "config.yaml")
        assert cfg["model"]["id"] == "from/dotenv"
    finally:
        os.environ.pop("MODEL_ID", None)  # set by python-dotenv, not by monkeypatch: undo it here


def test_templates_insert_values_literally():
    assert template_fields("a {x} {{literal}} {y}", "t") == ["x", "y"]
    out = render_template("Q: {q} {{not a placeholder}}", {"q": "{json: [1, 2]} \\frac{a}{b}"})
    assert out == "Q: {json: [1, 2]} \\frac{a}{b} {not a placeholder}"
    with pytest.raises(TemplateError, match="plain name"):
        templates.template_fields("{x:>10}", "t")
    with pytest.raises(ConfigError, match="plain name"):  # as config loading reports it
        template_fields("{x:>10}", "t")


def test_cli_strings_are_coerced_to_schema_types(resolved_config):
    """`--config 'hub={dry_run: true}'` reaches the Snakefile as strings."""
    cfg = resolved_config(
        {"hub": {"repo_id": "me/x", "dry_run": "true"}, "evaluation": {"max_new_tokens": "64"}}
    )
    assert cfg["hub"]["dry_run"] is True and cfg["hub"]["repo_id"] == "me/x"
    assert cfg["evaluation"]["max_new_tokens"] == 64
    with pytest.raises(ConfigError, match="hub.dry_run"):
        resolved_config({"hub": {"dry_run": "maybe"}})
