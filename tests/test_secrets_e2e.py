"""End to end: a secret embedded inside a longer config value (a system prompt) never reaches a file.

A first run builds the data stages with a clean prompt (so results/ and .snakemake/ hold real
artifacts and metadata, and the system prompt is shown to land in the preprocessed rows); then the
same workflow is started with the token inside the system prompt, from .env and from the
environment, through a config file and through --config. The load refuses it, naming the key; the
token is in no file under results/ or .snakemake/, not on the console, and nothing was rebuilt.
"""

import pandas as pd
import pytest
import yaml
from helpers import smk, tree_digest, write_config

pytestmark = pytest.mark.e2e  # every test goes on from a real run (`built`)

TOKEN = "hf_" + "E2eSecretInsidePrompt0123456789"


def files_under(root, *folders):
    return [p for f in folders for p in (root / f).rglob("*") if p.is_file() and not p.is_symlink()]


def assert_token_nowhere(wf, proc) -> None:
    files = files_under(wf, "results", ".snakemake")
    assert any(".snakemake" in p.parts for p in files) and any("results" in p.parts for p in files)
    for path in files:
        assert TOKEN.encode() not in path.read_bytes(), f"the token leaked into {path}"
    assert TOKEN not in proc.stdout + proc.stderr, "the token reached the console"


@pytest.fixture
def built(tiny_workflow):
    """The tiny workflow with its data stages built from a clean system prompt."""
    wf, cfg = tiny_workflow
    config = yaml.safe_load(cfg.read_text())
    config["messages_format"] = {"messages_format": {"system_prompt": "Be brief. Key: none"}}
    write_config(cfg, config)
    smk(wf, "--until", "preprocess_dataset", "--configfile", str(cfg))
    rows = [p for p in (wf / "results" / "shared" / "preprocessed").rglob("train.parquet")]
    first = pd.read_parquet(rows[0])["messages"][0] if rows else []
    assert first[0]["content"] == "Be brief. Key: none"  # where a leaked prompt would land
    return wf, cfg, config


def test_a_token_inside_the_system_prompt_from_dotenv_is_refused_and_written_nowhere(built, monkeypatch):
    wf, cfg, config = built
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    (wf / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    config["messages_format"]["messages_format"]["system_prompt"] = f"Be brief. Key: {TOKEN} (internal)"
    leaky = write_config(wf / "leaky.yaml", config)
    before = tree_digest(wf, skip=(".snakemake", "leaky.yaml"))
    proc = smk(wf, "--until", "preprocess_dataset", "--configfile", str(leaky), check=False)
    assert proc.returncode != 0
    assert "messages_format.messages_format.system_prompt: looks like a secret" in proc.stdout + proc.stderr
    assert_token_nowhere(wf, proc)
    assert tree_digest(wf, skip=(".snakemake", "leaky.yaml")) == before  # nothing rebuilt or written


def test_a_token_inside_a_prompt_given_on_the_command_line_is_refused_and_written_nowhere(built, monkeypatch):
    wf, cfg, _ = built
    monkeypatch.setenv("WANDB_API_KEY", TOKEN)  # any secret variable, also one not shaped like a token
    prompt = f"Be brief. Key: {TOKEN}"
    proc = smk(
        wf,
        "--until",
        "preprocess_dataset",
        "--configfile",
        str(cfg),
        "--config",
        f"messages_format={{messages_format: {{system_prompt: '{prompt}'}}}}",
        check=False,
    )
    assert proc.returncode != 0
    assert "system_prompt: looks like a secret" in proc.stdout + proc.stderr
    assert_token_nowhere(wf, proc)
