"""Never destroy, never leak: hostile names, secrets in config, trainer values, shared artifacts."""

import pytest
from helpers import planned_rules, smk, tree_digest, write_config

from workflow_scripts.errors import ConfigError
from workflow_scripts.layout import model_dir

HF = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7"


@pytest.mark.e2e
@pytest.mark.parametrize(
    "override, key",
    [
        ({"experiment": ".."}, "experiment"),
        ({"experiment": "."}, "experiment"),
        ({"experiment": ".hidden"}, "experiment"),
        ({"experiment": "a/b"}, "experiment"),
        ({"model": {"name": ".."}}, "model.name"),
        ({"model": {"name": "."}}, "model.name"),
        ({"model": {"id": "someone/.."}}, "model.id"),
        ({"model": {"id": "..."}}, "model.id"),
    ],
)
def test_hostile_names_are_refused_and_touch_nothing(workflow_copy, tiny_model_dir, override, key):
    (workflow_copy / "models" / "keep-me").mkdir(parents=True)
    (workflow_copy / "models" / "keep-me" / "weights").write_text("precious")
    cfg = write_config(workflow_copy / "hostile.yaml", override)
    before = tree_digest(workflow_copy)
    proc = smk(workflow_copy, "--until", "format_dataset", "--configfile", str(cfg), check=False)
    assert proc.returncode != 0
    assert key in proc.stdout + proc.stderr
    assert tree_digest(workflow_copy) == before
    assert (workflow_copy / "models" / "keep-me" / "weights").read_text() == "precious"
    assert not (workflow_copy / "results").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"training": {"hub_token": HF}},
            "training.hub_token: pushing to the Hub from the trainer is refused",
        ),
        ({"training": {"push_to_hub": True}}, "training.push_to_hub: pushing to the Hub"),
        ({"training": {"hub_private_repo": False}}, "training.hub_private_repo: pushing to the Hub"),
        ({"wandb": {"entity": HF}}, "wandb.entity: looks like a secret"),
        ({"training": {"run_name": "sk-" + "x" * 30}}, "training.run_name: looks like a secret"),
        ({"training": {"warmup_steps": "lots"}}, "training.warmup_steps"),
        ({"training": {"lr_scheduler_type": 42}}, "training.lr_scheduler_type"),
        ({"peft": {"use_rslora": "maybe"}}, "peft.use_rslora"),
        ({"training": {"max_steps": 0}}, "training.max_steps"),
        ({"training": {"max_steps": -7}}, "training.max_steps"),
    ],
)
def test_secrets_side_doors_and_bad_trainer_values_fail_at_load(resolved_config, override, message):
    with pytest.raises(ConfigError, match=message):
        resolved_config(override)


def test_a_hex_string_in_a_repo_id_is_not_a_secret(resolved_config):
    repo_id = "me/" + "0123456789abcdef" * 2 + "01234567"  # as long and as hex as a token, but not one
    assert resolved_config({"hub": {"repo_id": repo_id}})["hub"]["repo_id"] == repo_id


def test_a_secret_from_the_environment_is_refused_as_a_value(resolved_config, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "my-own-wandb-key-value")
    with pytest.raises(ConfigError, match="wandb.run_name: looks like a secret.*never config"):
        resolved_config({"wandb": {"run_name": "my-own-wandb-key-value"}})


def test_a_commit_hash_revision_is_not_a_secret(resolved_config):
    sha = "a" * 40
    assert resolved_config({"model": {"revision": sha}})["model"]["revision"] == sha


@pytest.mark.e2e
def test_the_refused_token_never_reaches_snakemake_metadata(workflow_copy):
    cfg = write_config(workflow_copy / "leak.yaml", {"training": {"hub_token": HF}})
    proc = smk(workflow_copy, "--until", "format_dataset", "--configfile", str(cfg), check=False)
    assert proc.returncode != 0
    for p in workflow_copy.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.name != "leak.yaml":
            assert HF.encode() not in p.read_bytes(), p


def test_the_base_model_folder_is_keyed_by_what_changes_it(resolved_config):
    a = model_dir(resolved_config()["model"])
    b = model_dir(resolved_config({"model": {"fallback_chat_template": "plain"}})["model"])
    c = model_dir(resolved_config({"model": {"trust_remote_code": True}})["model"])
    assert a != b and a == c
    assert a.startswith("models/smollm2-135m-instruct-")


@pytest.mark.e2e
def test_params_in_another_key_order_rerun_nothing(tiny_formatted):
    wf, cfg = tiny_formatted  # the session's `--until format_dataset` run, copied
    assert planned_rules(wf, "format_dataset", cfg) == set()
    reordered = write_config(
        wf / "order.yaml",
        {"messages_format": {"metadata_columns": ["question_type"]}, "filters": {"drop_empty": True}},
    )
    assert planned_rules(wf, "format_dataset", cfg, reordered) == set()


@pytest.mark.e2e
def test_two_experiments_with_different_templates_do_not_share_a_base_model(tiny_formatted):
    wf, cfg = tiny_formatted  # tiny.yaml's base model is prepared (the session's run, copied)
    other = write_config(
        wf / "other.yaml", {"experiment": "other", "model": {"fallback_chat_template": "plain"}}
    )
    assert len([p for p in (wf / "models").iterdir() if p.is_dir()]) == 1
    smk(wf, "--until", "prepare_base_model", "--configfile", str(cfg), str(other))
    folders = sorted(p.name for p in (wf / "models").iterdir() if p.is_dir())
    assert len(folders) == 2 and all(f.startswith("tiny-") for f in folders)
    assert planned_rules(wf, "prepare_base_model", cfg) == set()
    assert planned_rules(wf, "prepare_base_model", cfg, other) == set()
