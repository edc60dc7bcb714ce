"""push_to_hub: clear errors before any upload, and an exact dry-run listing."""

import json

import pytest

from workflow_scripts.common import StageError
from workflow_scripts.models import push_to_hub


@pytest.fixture
def deployment(tmp_path):
    d = tmp_path / "deployment_model"
    d.mkdir()
    for name in ("config.json", "model.safetensors", "README.md", "merge_report.json"):
        (d / name).write_text("x" * 10)
    evals = []
    for name in ("base_model_evaluation.json", "finetuned_model_evaluation.json", "comparison.json"):
        (tmp_path / name).write_text("{}")
        evals.append(str(tmp_path / name))
    return d, evals


def test_missing_repo_id_fails_before_upload(deployment, tmp_path):
    d, evals = deployment
    with pytest.raises(StageError, match="hub.repo_id: not set"):
        push_to_hub.run(str(d), evals, {"repo_id": None}, str(tmp_path / "r.json"))
    assert not (tmp_path / "r.json").exists()


def test_missing_token_fails_before_upload(deployment, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    d, evals = deployment
    with pytest.raises(StageError, match="HF_TOKEN: not set"):
        push_to_hub.run(str(d), evals, {"repo_id": "me/model", "dry_run": False}, str(tmp_path / "r.json"))


def test_dry_run_lists_exactly_what_would_be_uploaded(deployment, tmp_path, capsys):
    d, evals = deployment
    report = push_to_hub.run(
        str(d), evals, {"repo_id": "me/model", "dry_run": True}, str(tmp_path / "r.json")
    )
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
    assert report["private"] is True and report["dry_run"] is True
    assert "would upload model.safetensors (10 bytes)" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["files"] == report["files"]
