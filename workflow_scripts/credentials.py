"""Secrets: which environment variables hold them, and what a secret looks like in a config.

Secrets come from the environment (or .env) only: never from config, never written to a file.
The logs mask their values (logs.py); config loading refuses keys and values that look like one
(check_no_secrets, run by config.py before any other check).
"""

import os
import re

from workflow_scripts.errors import ConfigError

SECRET_ENV = ("HF_TOKEN", "WANDB_API_KEY", "HUGGING_FACE_HUB_TOKEN")
# Values that look like credentials (Hugging Face, W&B, OpenAI-style keys).
TOKEN_VALUE_RE = re.compile(r"^(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|[0-9a-f]{40}|wandb_v1_\w{20,})$")
# The same shapes inside a longer text (a prompt, a template), where no letter or digit runs into
# their prefix; a bare 40-hex string only as a whole value (commit hashes sit inside paths and ids).
TOKEN_INSIDE_RE = re.compile(r"(?<![A-Za-z0-9])(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|wandb_v1_\w{20,})")
# Keys that name a credential (not pad_token / eos_token, which name vocabulary entries).
SECRET_KEY_RE = re.compile(
    r"^(token|(hf|hub|access|auth|api|wandb)_token|(wandb_)?api_?key|password|secret)$", re.IGNORECASE
)


def env_secrets() -> set[str]:
    """The values of the secret variables that are set."""
    return {os.environ[k] for k in SECRET_ENV if os.environ.get(k)}


def secret_values() -> list[str]:
    """The values of the secret variables (4 characters or more), longest first."""
    values = {os.environ.get(k, "") for k in SECRET_ENV}
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)


def hf_token() -> str | None:
    """The Hub token, from the environment only (never from config, never written anywhere)."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


# Trainer keys that would let training talk to the Hub behind the opt-in push_to_hub rule.
HUB_TRAINING_KEYS = re.compile(r"^(push_to_hub.*|hub_.*)$")


# Shortest secret value looked for in the config (real HF / W&B tokens are 30+ characters; a short
# CI placeholder such as HF_TOKEN=test would otherwise match the split named `test`).
SECRET_MIN_CHARS = 8


def _strings(value, path: str):
    """(path, text, is_key) of every string in the config: mapping keys (before their values) and
    values, with numbers as text too."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield path, str(k), True
            yield from _strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")
    elif value is not None and not isinstance(value, bool):
        yield path, str(value), False


def check_no_secrets(config: dict) -> None:
    """Secrets are never config (Snakemake records the config in .snakemake/metadata): a value under
    a key that names a credential, and a secret's value or a credential's shape anywhere inside a
    key or value is refused. Runs before every other check, so no error message echoes a secret
    (a refused key is named by the mapping that holds it)."""
    training = config.get("training")
    for key in training if isinstance(training, dict) else ():
        if HUB_TRAINING_KEYS.match(key):
            raise ConfigError(
                f"training.{key}: pushing to the Hub from the trainer is refused; the opt-in "
                "`push_to_hub` rule (hub.repo_id, private by default) is the one way out, and the "
                "token comes from HF_TOKEN in the environment or .env"
            )
    whole = {s for s in env_secrets() if len(s) >= SECRET_MIN_CHARS}
    inside = [s for s in secret_values() if len(s) >= SECRET_MIN_CHARS]
    for path, text, is_key in _strings(config, ""):
        if not text:
            continue
        # the key a value belongs to: `revision` for a sweep's `model.revision[0]` and for
        # `sweep.samples.space.model.revision.choice[0]`
        parts = re.sub(r"\[\d+\]", "", path).split(".")
        leaf = parts[-2] if len(parts) > 1 and parts[-1] in ("choice", "range", "log_range") else parts[-1]
        found = (
            text in whole
            or any(s in text for s in inside)
            or TOKEN_INSIDE_RE.search(text)
            or (TOKEN_VALUE_RE.match(text) and (is_key or not leaf.endswith("revision")))
            or (not is_key and SECRET_KEY_RE.match(leaf))
        )
        if found:
            where = f"a key of {path or 'the top level'}" if is_key else path
            raise ConfigError(
                f"{where}: looks like a secret or holds one; secrets are never config (they would be "
                "recorded in .snakemake/metadata). Put it in .env or the environment (HF_TOKEN, WANDB_API_KEY)"
            )
