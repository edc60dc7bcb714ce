"""Shared fixtures, and the session set-up: the repository on ``sys.path`` and offline/disabled
defaults for the Hub and W&B. The fixtures: a tiny model and its tokenizer saved once per session
(``tiny_model_dir``, ``tiny_tokenizer``), the sample rows as JSONL (``sample_jsonl``), the resolved
default config (``resolved_config``), a fresh workflow copy (``workflow_copy``, ``tiny_workflow``),
and the tiny workflow's data stages run once per session (``tiny_formatted_run``), each test
getting its own copy of the finished run (``tiny_formatted``).

Plain helpers (paths, tiny models, Snakemake runs: ``smk``, ``planned_rules``, ...) live in
``helpers.py``; tests import them with ``from helpers import ...``."""

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import REPO, copy_run, new_workflow, sample_rows, save_tiny_model, smk, tiny_config

sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from workflow_scripts.models.loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def sample_jsonl(tmp_path_factory) -> Path:
    """120 sample rows as a JSONL file (read only: tests that change data write their own)."""
    path = tmp_path_factory.mktemp("sample") / "sample.jsonl"
    with path.open("w") as f:
        for row in sample_rows(120):
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def resolved_config():
    """The default config, resolved (what the Snakefile sees)."""
    from workflow_scripts.config import load_and_resolve

    def make(overrides=None):
        return load_and_resolve(REPO / "config.yaml", overrides or {})

    return make


@pytest.fixture
def workflow_copy(tmp_path):
    """A fresh copy of the workflow in a temporary folder (nothing run yet)."""
    return new_workflow(tmp_path / "wf")


@pytest.fixture
def tiny_workflow(workflow_copy, tiny_model_dir, sample_jsonl):
    """A fresh workflow copy and its tiny.yaml (nothing run yet)."""
    return workflow_copy, tiny_config(workflow_copy, tiny_model_dir, sample_jsonl)


@pytest.fixture(scope="session")
def tiny_formatted_run(tmp_path_factory, tiny_model_dir, sample_jsonl):
    """The tiny workflow after `--until format_dataset` (download, preprocess, prepare_base_model,
    format): run once per session. Tests take a copy (``tiny_formatted``), never this folder."""
    wf = new_workflow(tmp_path_factory.mktemp("tiny-formatted") / "wf")
    cfg = tiny_config(wf, tiny_model_dir, sample_jsonl)
    smk(wf, "--until", "format_dataset", "--configfile", str(cfg))
    return wf, cfg


@pytest.fixture
def tiny_formatted(tiny_formatted_run, tmp_path):
    """A copy of the tiny workflow with its data stages and base model done, and its tiny.yaml."""
    src, cfg = tiny_formatted_run
    wf = copy_run(src, tmp_path / "wf")
    return wf, wf / cfg.name
