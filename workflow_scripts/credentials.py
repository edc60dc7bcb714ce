"""Secrets: which environment variables hold them, and what a secret looks like in a config.

Secrets come from the environment (or .env) only: never from config, never written to a file.
The logs mask their values (logs.py); config loading refuses keys and values that look like one
(config.py).
"""

import os
import re

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
