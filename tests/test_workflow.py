"""The Snakemake workflow itself: config errors before any job, staleness, and one real end-to-end run."""

import json

import pytest
import yaml
from helpers import planned_rules, smk, write_config


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"peft": {"r": "sixteen"}}, "peft.r"),
        ({"training": {"learning_rate": -1}}, "training.learning_rate"),
        ({"unknown_section": {"a": 1}}, "unknown_section"),
    ],
)
def test_bad_config_is_refused_before_any_job(workflow_copy, bad, key):
    cfg = write_config(workflow_copy / "bad.yaml", bad)
    proc = smk(workflow_copy, "-n", "--configfile", str(cfg), check=False)
    assert proc.returncode != 0
    assert key in proc.stdout + proc.stderr
    assert not (workflow_copy / "results").exists()


@pytest.mark.e2e
def test_data_stages_rerun_only_what_a_change_touches(tiny_formatted):
    wf, cfg = tiny_formatted  # the session's `--until format_dataset` run, copied
    shared = wf / "results" / "shared"
    (formatted,) = (shared / "formatted").iterdir()
    assert (formatted / "train.parquet").is_file()
    (preprocessed,) = (shared / "preprocessed").iterdir()
    assert json.loads((preprocessed / "report.json").read_text())["train"]["rows_kept"] > 0
    assert planned_rules(wf, "format_dataset", cfg) == set(), "a second run must be a no-op"

    peft_change = write_config(wf / "peft.yaml", {"peft": {"r": 4}})
    assert planned_rules(wf, "format_dataset", cfg, peft_change) == set()
    assert "download_dataset" not in planned_rules(wf, "train", cfg, peft_change)

    mf = yaml.safe_load((wf / "config.yaml").read_text())["messages_format"]
    mf["messages_format"]["system_prompt"] = "Be brief."
    mf_change = write_config(wf / "mf.yaml", {"messages_format": mf})
    assert planned_rules(wf, "format_dataset", cfg, mf_change) == {"preprocess_dataset", "format_dataset"}


@pytest.mark.e2e
@pytest.mark.parametrize(
    "override, message",
    [
        ({"dataset": {"id": "no/such/dir/data.jsonl"}}, "no/such/dir/data.jsonl does not exist"),
        (
            {
                "messages_format": {
                    "training_columns": {
                        "question": "Open-ended Verifiable Question",
                        "cot": "Reasoning",
                        "response": "Response",
                    }
                }
            },
            "'Reasoning' is not in the train data",
        ),
    ],
)
def test_bad_input_fails_with_a_clear_message_and_no_outputs(tiny_formatted, override, message):
    wf, cfg = tiny_formatted  # the default config's data stages are done; the bad config's are not
    before = {p: p.read_text() for p in (wf / "results").rglob("*.log")}
    kept = sorted((wf / "results").glob("shared/preprocessed/*/*.parquet"))
    assert kept, "the copied run has the default config's preprocessed splits"
    bad = write_config(wf / "bad.yaml", override)
    proc = smk(wf, "--until", "preprocess_dataset", "--configfile", str(cfg), str(bad), check=False)
    assert proc.returncode != 0
    logs = "".join(p.read_text() for p in (wf / "results").rglob("*.log") if before.get(p) != p.read_text())
    assert message in logs + proc.stdout + proc.stderr  # a missing file fails at load, before any log
    assert sorted((wf / "results").glob("shared/preprocessed/*/*.parquet")) == kept, "no new outputs"


@pytest.mark.e2e
def test_embedded_model_end_to_end(workflow_copy):
    """The real embedded SmolLM2 through every stage with a handful of steps."""
    cfg = write_config(
        workflow_copy / "e2e.yaml",
        {
            "experiment": "e2e",
            "dataset": {"max_rows": 40},
            "training": {"max_steps": 3, "eval_steps": 3, "save_steps": 3, "per_device_train_batch_size": 2},
            "evaluation": {"max_examples": 4, "max_new_tokens": 8, "batch_size": 4},
            # both general-ability jobs still run on the real model; 200 passages took ~36 s of them
            "general_ability": {"text_loss": {"passages": 16}},
            "wandb": {"mode": "disabled"},
            "resources": {"threads": 1},  # independent stages run side by side on the 2 cores
        },
    )
    smk(workflow_copy, "--configfile", str(cfg))
    res = workflow_copy / "results" / "e2e"
    report = json.loads((res / "deployment_model" / "merge_report.json").read_text())
    assert report["max_logit_diff"] <= 1e-3
    for name in ("finetuned_model_evaluation.json", "comparison.json", "comparison.md"):
        assert (res / "evaluation" / name).is_file()
    index = json.loads((res / "experiment.json").read_text())
    ev = json.loads(
        (workflow_copy / index["shared"]["base_evaluation"] / "base_model_evaluation.json").read_text()
    )
    assert ev["n_examples"] == 4 and "answer_accuracy" in ev["metrics"]
    (base,) = [p for p in (workflow_copy / "models").glob("smollm2-135m-instruct-*") if p.is_dir()]
    manifest = json.loads((base / "manifest.json").read_text())
    assert manifest["parameters"] > 100_000_000 and manifest["weights_sha256"]
    config = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in config
    assert planned_rules(workflow_copy, "all", cfg) == set()
