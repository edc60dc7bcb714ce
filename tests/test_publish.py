"""push_to_hub and the model card: clear errors before any upload, an exact dry-run listing, the
card the Hub expects (real base model id, metadata, comparison table and model-index), the GGUF
files when they were exported for this model, and no workflow internals."""

import json

import pytest
from helpers import with_defaults
from huggingface_hub import ModelCard

from workflow_scripts.models import model_card, push_to_hub
from workflow_scripts.models.families import CAUSAL_LM, GEMMA3N
from workflow_scripts.stage import Job, StageError

COMPARISON = {
    "n_examples": 64,
    "metrics": {
        "answer_accuracy": {
            "base": 0.05,
            "finetuned": 0.42,
            "delta": 0.37,
            "ci95": [0.27, 0.48],
            "significant": True,
        },
        "rougeL": {"base": 0.09, "finetuned": 0.82, "delta": 0.73, "ci95": [0.6, 0.8], "significant": True},
    },
    "accuracy_by_type": {"lookup": {"n": 12, "base": 0.0, "finetuned": 0.83}},
}
MANIFEST = {
    "model_id": "embedded:smollm2-135m-instruct",
    "source": {"kind": "gguf"},
    "architecture": "LlamaForCausalLM",
    "parameters": 134515008,
    "chat_template": "model",
}
MERGE_REPORT = {"max_logit_diff": 1.2e-4, "tolerance": 1e-3, "n_prompts": 4}


@pytest.fixture
def experiment(tmp_path):
    """A deployment model (with Snakemake's timestamp), its base model's manifest and evaluations."""
    base = tmp_path / "models" / "smollm2"
    base.mkdir(parents=True)
    (base / "manifest.json").write_text(json.dumps(MANIFEST))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32}))
    d = tmp_path / "results" / "default" / "deployment_model"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    for name in ("model.safetensors", "merge_report.json"):
        (d / name).write_text("x" * 10)
    (d / ".snakemake_timestamp").write_text("")
    (d / ".hidden").mkdir()
    (d / ".hidden" / "tmp").write_text("x")
    (d / "README.md").write_text(
        model_card.merge_card(str(base), str(adapter), {"global_step": 90}, MERGE_REPORT, CAUSAL_LM)
    )
    ev = tmp_path / "results" / "default" / "evaluation"
    ev.mkdir()
    files = {}
    for key, name, data in (
        ("base", "base_model_evaluation.json", {}),
        (
            "finetuned",
            "finetuned_model_evaluation.json",
            {"generation": {"max_new_tokens": 96, "do_sample": False}},
        ),
        ("comparison", "comparison.json", COMPARISON),
    ):
        (ev / name).write_text(json.dumps(data))
        files[key] = str(ev / name)
    return tmp_path, {"deployment_dir": str(d), "base_model_dir": str(base), **files}


def job(tmp_path, inputs, hub, dataset=None, export_report=None):
    hub_dir = tmp_path / "results" / "default" / "hub"
    return Job(
        input=inputs,
        output={"report": str(hub_dir / "push_report.json"), "card": str(hub_dir / "README.md")},
        params={
            "hub": with_defaults("hub", hub),  # the section as the rule passes it (defaults filled)
            "dataset": dataset or {"id": "data/sample/finqa_sample.jsonl"},
            "export_report": export_report
            or str(tmp_path / "results" / "default" / "export" / "export_report.json"),
        },
    )


def test_missing_repo_id_fails_before_upload(experiment):
    tmp_path, inputs = experiment
    with pytest.raises(StageError, match="hub.repo_id: not set"):
        push_to_hub.run(job(tmp_path, inputs, {"repo_id": None}))
    assert not (tmp_path / "results" / "default" / "hub").exists()


def test_missing_token_fails_before_upload(experiment, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    tmp_path, inputs = experiment
    with pytest.raises(StageError, match="HF_TOKEN: not set"):
        push_to_hub.run(job(tmp_path, inputs, {"repo_id": "me/model", "dry_run": False}))
    assert not (tmp_path / "results" / "default" / "hub").exists()


def test_dry_run_lists_exactly_what_would_be_uploaded_and_no_internals(experiment, capsys):
    tmp_path, inputs = experiment
    report = push_to_hub.run(job(tmp_path, inputs, {"repo_id": "me/model", "dry_run": True}))
    paths = [f["path_in_repo"] for f in report["files"]]
    assert paths == [
        "README.md",
        "config.json",
        "merge_report.json",
        "model.safetensors",
        "evaluation/base_model_evaluation.json",
        "evaluation/finetuned_model_evaluation.json",
        "evaluation/comparison.json",
    ]
    assert not any(".snakemake_timestamp" in p or ".hidden" in p for p in paths)
    assert report["private"] is True and report["dry_run"] is True
    assert "would upload model.safetensors (10 bytes)" in capsys.readouterr().out
    hub = tmp_path / "results" / "default" / "hub"
    assert json.loads((hub / "push_report.json").read_text())["files"] == report["files"]
    card_bytes = (hub / "README.md").stat().st_size
    assert report["files"][0] == {
        "path_in_repo": "README.md",
        "bytes": card_bytes,
    }  # the Hub card, not merge's


def test_merge_card_names_the_real_base_model(experiment):
    tmp_path, inputs = experiment
    card = ModelCard((tmp_path / "results/default/deployment_model/README.md").read_text())
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "transformers" and "lora" in card.data.tags
    assert "embedded:" not in str(card.data.to_dict())
    assert 'from_pretrained("path/to/deployment_model")' in card.text
    assert "max |logit(merged) - logit(base + adapter)| = 1.20e-04" in card.text


def test_merge_card_takes_the_familys_task_and_usage_snippet(experiment):
    tmp_path, inputs = experiment
    text = model_card.merge_card(
        inputs["base_model_dir"], str(tmp_path / "adapter"), {}, MERGE_REPORT, GEMMA3N
    )
    assert 'AutoModelForImageTextToText.from_pretrained("path/to/deployment_model")' in text
    assert "AutoModelForCausalLM" not in text
    assert ModelCard(text).data.pipeline_tag == "image-text-to-text"


def test_hub_card_has_the_metadata_the_hub_reads(experiment):
    tmp_path, inputs = experiment
    push_to_hub.run(
        job(
            tmp_path,
            inputs,
            {"repo_id": "me/smollm2-finqa", "dry_run": True},
            dataset={"id": "TheFinAI/FinQA"},
        )
    )
    card = ModelCard((tmp_path / "results/default/hub/README.md").read_text())
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.datasets == ["TheFinAI/FinQA"] and data.license == "apache-2.0"
    assert data.pipeline_tag == "text-generation" and data.model_name == "me/smollm2-finqa"
    results = {r.metric_name: r for r in data.eval_results}
    assert (
        results["answer_accuracy"].metric_value == 0.42
        and results["answer_accuracy"].metric_type == "accuracy"
    )
    assert (
        results["answer_accuracy"].dataset_type == "TheFinAI/FinQA"
        and results["rougeL"].dataset_split == "test"
    )
    assert "| answer_accuracy | 0.050 | 0.420 | +0.370 * | [+0.270, +0.480] |" in card.text
    assert "| lookup | 12 | 0.00 | 0.83 |" in card.text
    assert 'from_pretrained("me/smollm2-finqa")' in card.text and "path/to/deployment_model" not in card.text
    # merge's own card is unchanged; the Hub card is written beside the push report
    assert "## Evaluation" not in (tmp_path / "results/default/deployment_model/README.md").read_text()


def test_local_dataset_is_named_but_not_claimed_as_a_hub_dataset(experiment):
    tmp_path, inputs = experiment
    push_to_hub.run(job(tmp_path, inputs, {"repo_id": "me/m", "dry_run": True}))
    data = ModelCard((tmp_path / "results/default/hub/README.md").read_text()).data
    assert data.datasets is None
    assert {r.dataset_type for r in data.eval_results} == {"finqa_sample"}


def write_export(tmp_path, deployment_dir, sha=None, checked_in_llama_cpp=True):
    from workflow_scripts.models.export_gguf import weights_sha256

    export = tmp_path / "results" / "default" / "export"
    export.mkdir(parents=True, exist_ok=True)
    (export / "m-q8_0.gguf").write_bytes(b"GGUF" + b"0" * 96)
    (export / ".m-f16.gguf.tmp-abc").write_bytes(b"GGUF")  # an interrupted export's temporary file
    report = {
        "passed": True,
        **({"runtime": "llama-cpp-python"} if checked_in_llama_cpp else {}),
        "source_weights_sha256": sha or weights_sha256(deployment_dir),
        "files": {
            "q8_0": {
                "file": "m-q8_0.gguf",
                "mean_kl": 2.6e-3,
                "greedy_identical": "16/16",
            }
        },
    }
    (export / "export_report.json").write_text(json.dumps(report))
    return export


def test_exported_gguf_files_are_uploaded_with_the_model(experiment):
    tmp_path, inputs = experiment
    write_export(tmp_path, inputs["deployment_dir"])
    report = push_to_hub.run(job(tmp_path, inputs, {"repo_id": "me/m", "dry_run": True}))
    paths = [f["path_in_repo"] for f in report["files"]]
    assert paths[-2:] == ["m-q8_0.gguf", "export_report.json"]
    assert not any("tmp" in p for p in paths)
    card = ModelCard((tmp_path / "results/default/hub/README.md").read_text())
    assert "gguf" in card.data.tags
    assert (
        "| `m-q8_0.gguf` | q8_0 | 0.0 MiB | in llama.cpp: mean KL 2.6e-03 from this model, greedy answers "
        "identical on 16/16 test prompts |" in card.text
    )


def test_gguf_files_of_another_deployment_model_are_not_uploaded(experiment):
    tmp_path, inputs = experiment
    write_export(tmp_path, inputs["deployment_dir"], sha={"model.safetensors": "0" * 64})
    report = push_to_hub.run(job(tmp_path, inputs, {"repo_id": "me/m", "dry_run": True}))
    assert not any(f["path_in_repo"].endswith(".gguf") for f in report["files"])
    assert "## GGUF" not in (tmp_path / "results/default/hub/README.md").read_text()


def test_gguf_files_checked_before_the_llama_cpp_check_are_not_uploaded(experiment):
    """An export_report.json of the earlier check (transformers' loader, no llama.cpp figures) for
    the same weights: its files are left out until export_gguf runs again."""
    tmp_path, inputs = experiment
    write_export(tmp_path, inputs["deployment_dir"], checked_in_llama_cpp=False)
    report = push_to_hub.run(job(tmp_path, inputs, {"repo_id": "me/m", "dry_run": True}))
    assert not any(f["path_in_repo"].endswith(".gguf") for f in report["files"])
    assert "## GGUF" not in (tmp_path / "results/default/hub/README.md").read_text()


def sweep_job(tmp_path, inputs, act_on):
    """push_to_hub after a sweep of two points: `a~1` (the winner, the fixture's model) and `b~2`
    (another folder); each candidate holds the rule's inputs and settings for it."""
    sweep = tmp_path / "results" / "sweeps" / "s"
    sweep.mkdir(parents=True)
    (sweep / "best.json").write_text(json.dumps({"experiment": "sweeps/s/a~1", "select_by": "eval_loss"}))
    other = {k: v.replace("results/default", "results/other") for k, v in inputs.items()}
    candidates = {
        "sweeps/s/a~1": {
            "root": str(tmp_path / "results/default"),
            "input": inputs,
            "params": {"dataset": None},
        },
        "sweeps/s/b~2": {
            "root": str(tmp_path / "results/other"),
            "input": other,
            "params": {"dataset": None},
        },
    }
    return Job(
        input={"best": str(sweep / "best.json"), "candidates": [*inputs.values(), *other.values()]},
        output={"report": str(sweep / "hub/push_report.json"), "card": str(sweep / "hub/README.md")},
        params={
            "hub": with_defaults("hub", {"repo_id": "me/m", "dry_run": True}),
            "export_report": str(sweep / "export/export_report.json"),
            "candidates": candidates,
            "act_on": act_on,
        },
    )


def test_after_a_sweep_the_winner_is_pushed_and_its_card_says_which_point_it_is(experiment):
    tmp_path, inputs = experiment
    report = push_to_hub.run(sweep_job(tmp_path, inputs, "best"))
    assert report["acted_on"]["point"] == "sweeps/s/a~1" and report["acted_on"]["is_winner"]
    # the winner's folder, whose model files are uploaded (b~2's folder does not even exist)
    assert report["acted_on"]["results_dir"] == str(tmp_path / "results/default")
    assert not (tmp_path / "results/other").exists()
    assert {"config.json", "model.safetensors"} <= {f["path_in_repo"] for f in report["files"]}
    card = (tmp_path / "results/sweeps/s/hub/README.md").read_text()
    assert (
        "## Sweep\n\nThis model is point `a~1` of the sweep `s`: the point the sweep selected on the " in card
    )
    assert not (tmp_path / "results/default/hub").exists()


def test_a_point_named_by_act_on_is_pushed_and_its_card_names_the_winner_too(experiment):
    tmp_path, inputs = experiment
    job = sweep_job(tmp_path, inputs, "a~1")
    (tmp_path / "results/sweeps/s/best.json").write_text(
        json.dumps({"experiment": "sweeps/s/b~2", "select_by": "eval_loss"})
    )
    report = push_to_hub.run(job)
    assert report["acted_on"]["point"] == "sweeps/s/a~1" and not report["acted_on"]["is_winner"]
    card = (tmp_path / "results/sweeps/s/hub/README.md").read_text()
    assert "point `a~1` of the sweep `s`: chosen by name (`sweep.act_on`); the sweep selected `b~2`" in card


def test_an_unknown_point_fails_before_anything_is_written(experiment):
    tmp_path, inputs = experiment
    with pytest.raises(StageError, match=r"sweep.act_on: 'c~3' is not a point of this sweep"):
        push_to_hub.run(sweep_job(tmp_path, inputs, "c~3"))
    assert not (tmp_path / "results/sweeps/s/hub").exists()


@pytest.mark.parametrize(
    "manifest, expected",
    [
        ({"model_id": "embedded:gemma3-270m"}, "google/gemma-3-270m"),
        ({"model_id": "google/gemma-3n-e2b-it", "source": {"kind": "hub"}}, "google/gemma-3n-e2b-it"),
        ({"model_id": "/data/my-model", "source": {"kind": "folder"}}, None),
        ({"model_id": "models/x.gguf", "source": {"kind": "gguf"}}, None),
    ],
)
def test_base_model_is_a_hub_id_or_absent(manifest, expected):
    assert model_card.base_model_origin(manifest)["base_model"] == expected
