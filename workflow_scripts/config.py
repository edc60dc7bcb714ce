"""Config resolution: .env, `file:` sections, environment overrides, schema and key checks.

Called by the Snakefile at load time (before any job runs), and by tests. Loading must stay
fast (a no-op `snakemake -n` is expected in seconds), so the accepted TRL / PEFT keys and
their value types are read from ``trainer_keys.json`` (trainer_fields.py; regenerate with
``python -m workflow_scripts.trainer_fields --write``; a test checks it matches the installed
libraries) rather than importing TRL at every launch.
"""

import copy
import difflib
import functools
import hashlib
import json
import os
import re
import string
import sys
from pathlib import Path
from typing import Any

import yaml

from workflow_scripts import trainer_fields

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"

# snaketune's own keys inside `training` / `peft` (everything else must be a TRL / PEFT field).
OWN_TRAINING_KEYS = {
    "file",
    "overlength",
    "early_stopping_patience",
    "num_processes",
    "accelerate_config",
    "fast_path",
}
OWN_PEFT_KEYS = {"file"}
FILE_SECTIONS = ("messages_format", "training", "peft")
# Environment variable -> (section, key) it overrides.
ENV_OVERRIDES = {
    "MODEL_ID": ("model", "id"),
    "DATASET": ("dataset", "id"),
    "SNAKETUNE_SLURM_PARTITION": ("resources", "slurm_partition"),
    "SNAKETUNE_SLURM_ACCOUNT": ("resources", "slurm_account"),
}


# Open mappings a user's config replaces as a whole instead of merging into the default's
# (Snakemake deep-merges --configfile into config.yaml; a dataset without the default's `cot`
# column must be able to drop it).
REPLACED_MAPPINGS = (
    ("messages_format", "training_columns"),
    ("messages_format", "evaluate_columns"),
    ("filters", "min_chars"),
    ("filters", "max_chars"),
)
# A name used as a folder: no `.`/`..`, no leading dot, nothing that breaks paths or job names.
SAFE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Trainer keys that would let training talk to the Hub behind the opt-in push_to_hub rule.
HUB_TRAINING_KEYS = re.compile(r"^(push_to_hub.*|hub_.*)$")
# Values that look like credentials (Hugging Face, W&B, OpenAI-style keys).
TOKEN_VALUE_RE = re.compile(r"^(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|[0-9a-f]{40}|wandb_v1_\w{20,})$")
# Keys that name a credential (not pad_token / eos_token, which name vocabulary entries).
SECRET_KEY_RE = re.compile(
    r"^(token|(hf|hub|access|auth|api|wandb)_token|(wandb_)?api_?key|password|secret)$", re.IGNORECASE
)


class ConfigError(ValueError):
    pass


def check_safe_name(name: str, key: str) -> str:
    """``name`` unchanged if it is safe as one folder name; ConfigError naming ``key`` otherwise."""
    if not isinstance(name, str) or not SAFE_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{key}: {name!r} cannot be used as a folder name (letters, digits, `_`, `-`, `.`; "
            "not starting with `.`; `.` and `..` are refused)"
        )
    return name


def template_fields(template: str, where: str) -> list[str]:
    """Placeholder names of a template; `{{`/`}}` are literal braces."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(
            f"{where}: malformed template {template!r} ({exc}); write literal braces as {{{{ }}}}"
        ) from None
    names = []
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if spec or conv or not name.isidentifier():
            raise ConfigError(f"{where}: placeholder {{{name}}} must be a plain name (no format spec)")
        names.append(name)
    return names


def render_template(template: str, values: dict[str, str]) -> str:
    """Insert values literally: braces inside the data are never interpreted."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            out.append(values[name])
    return "".join(out)


def load_env_file(path: str | os.PathLike = ".env") -> None:
    if Path(path).is_file():
        from dotenv import load_dotenv

        load_dotenv(path, override=False)


def merge_section_files(config: dict, base_dir: Path, user: dict) -> None:
    for section in FILE_SECTIONS:
        sec = config.get(section)
        if not isinstance(sec, dict) or not sec.get("file"):
            continue
        path = Path(sec["file"])
        if not path.is_absolute():
            path = base_dir / path
        if not path.is_file():
            raise ConfigError(f"{section}.file: {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{section}.file: {path} must hold a mapping of {section} keys")
        # The file is the user's explicit choice: its keys replace the section's defaults.
        sec.update(loaded)
        user.setdefault(section, {}).update(copy.deepcopy(loaded))


def _user_value(user: dict, section: str, key: str):
    sec = user.get(section)
    return (True, sec[key]) if isinstance(sec, dict) and key in sec else (False, None)


def apply_replacements(config: dict, user: dict) -> None:
    """The user's open mappings replace the default's (Snakemake merged them key by key)."""
    for section, key in REPLACED_MAPPINGS:
        given, value = _user_value(user, section, key)
        if given:
            config.setdefault(section, {})[key] = copy.deepcopy(value)
    given_columns, _ = _user_value(user, "messages_format", "training_columns")
    if not given_columns:
        return
    for key in ("min_chars", "max_chars"):
        given, _ = _user_value(user, "filters", key)
        default = config.get("filters", {}).get(key)
        if not given and default:
            # The default's limits name the default's placeholders, not the user's.
            print(
                f"snaketune: filters.{key} of the default config ({default}) is not applied to your "
                f"messages_format.training_columns; set filters.{key} to filter your columns",
                file=sys.stderr,
            )
            config["filters"][key] = {}


def apply_env_overrides(config: dict) -> None:
    for var, (section, key) in ENV_OVERRIDES.items():
        if os.environ.get(var):
            config.setdefault(section, {})[key] = os.environ[var]


def _check_keys(section: str, given: dict, allowed: set[str], owner: str) -> None:
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{section}.{key}: not a {owner} field nor a snaketune key{hint}")


def check_semantics(config: dict) -> None:
    """Checks JSON schema cannot express; each names the key at fault."""
    keys = trainer_fields.allowed_keys()
    _check_keys("training", config["training"], keys["training"] | OWN_TRAINING_KEYS, "TRL SFTConfig")
    _check_keys("peft", config["peft"], keys["peft"] | OWN_PEFT_KEYS, "PEFT LoraConfig")
    trainer_fields.check_values("training", config["training"], OWN_TRAINING_KEYS)
    trainer_fields.check_values("peft", config["peft"], OWN_PEFT_KEYS)

    split = config["dataset"]["split"]
    total = split["train"] + split["validation"] + split["test"]
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(
            f"dataset.split: train + validation + test must sum to 1, got {total:g} "
            f"({split['train']} + {split['validation']} + {split['test']})"
        )

    check_messages_format(config["messages_format"], config["filters"])
    check_answer_regex(config["filters"])
    check_names(config)
    check_no_secrets(config)
    check_local_dataset(config["dataset"])


def check_answer_regex(filters: dict) -> None:
    if filters.get("answer_regex") is not None:
        try:
            re.compile(filters["answer_regex"])
        except re.error as exc:
            raise ConfigError(
                f"filters.answer_regex: {filters['answer_regex']!r} is not a valid regex ({exc})"
            ) from None


def check_names(config: dict) -> None:
    check_safe_name(config["experiment"], "experiment")
    if config["model"].get("name") is not None:
        check_safe_name(config["model"]["name"], "model.name")
    model_name(config["model"])  # a derived name is checked too


def _walk(value, path: str):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, value


def check_no_secrets(config: dict) -> None:
    """Secrets are never config (Snakemake records the config in .snakemake/metadata)."""
    for key in config["training"]:
        if HUB_TRAINING_KEYS.match(key):
            raise ConfigError(
                f"training.{key}: pushing to the Hub from the trainer is refused; the opt-in "
                "`push_to_hub` rule (hub.repo_id, private by default) is the one way out, and the "
                "token comes from HF_TOKEN in the environment or .env"
            )
    env_secrets = {
        os.environ[k] for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY") if os.environ.get(k)
    }
    for path, value in _walk(config, ""):
        if not isinstance(value, str) or not value:
            continue
        leaf = path.rsplit(".", 1)[-1]
        looks = TOKEN_VALUE_RE.match(value) and not leaf.endswith("revision")
        if looks or value in env_secrets or SECRET_KEY_RE.match(leaf):
            raise ConfigError(
                f"{path}: looks like a secret; secrets are never config (they would be recorded in "
                ".snakemake/metadata). Put it in .env or the environment (HF_TOKEN, WANDB_API_KEY)"
            )


def check_local_dataset(dataset: dict) -> None:
    """A local dataset's files per split are known at load: an unrecognised file fails here."""
    from workflow_scripts.data.sources import SourceError, local_split_files, looks_local

    if not looks_local(dataset["id"]):
        if dataset["data_files"] is None:
            return
    elif dataset["split_names"]:
        raise ConfigError(
            "dataset.split_names: only for Hub datasets; name local files with dataset.data_files"
        )
    try:
        if looks_local(dataset["id"]):
            local_split_files(dataset)
    except SourceError as exc:
        raise ConfigError(str(exc)) from None


def check_messages_format(mf: dict, filters: dict) -> None:
    """Templates use only defined placeholders; filters name only placeholders."""
    messages = mf["messages_format"]["messages"]
    if messages[-1]["role"] != "assistant":
        raise ConfigError(
            "messages_format.messages_format.messages: the last message must be the assistant's"
        )
    user_turns = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not user_turns:
        raise ConfigError(
            "messages_format.messages_format.messages: no user message; the prompt needs a user turn "
            "with a {placeholder} of a question column"
        )
    defined = set(mf["training_columns"]) | {"system_prompt"}
    for i, msg in enumerate(messages):
        where = f"messages_format.messages_format.messages[{i}].content"
        for name in template_fields(msg["content"], where):
            if name not in defined:
                raise ConfigError(
                    f"{where}: unknown placeholder {{{name}}}; defined names: {', '.join(sorted(defined))}"
                )
            if name == "system_prompt" and mf["messages_format"].get("system_prompt") is None:
                raise ConfigError(
                    f"{where}: uses {{system_prompt}} but messages_format.system_prompt is not set"
                )
    row_names = set(mf["training_columns"])
    for i, role in ((user_turns[-1], "user"), (len(messages) - 1, "assistant")):
        where = f"messages_format.messages_format.messages[{i}].content"
        if not set(template_fields(messages[i]["content"], where)) & row_names:
            raise ConfigError(
                f"{where}: the {role} message has no placeholder of a column "
                f"({', '.join(sorted(row_names))}); every row would get the same {role} text"
            )
    names = ", ".join(sorted(mf["training_columns"]))
    for key in ("min_chars", "max_chars"):
        for name in filters.get(key) or {}:
            if name not in mf["training_columns"]:
                raise ConfigError(f"filters.{key}.{name}: not a placeholder name; names: {names}")


def resolve(config: dict, base_dir: str | os.PathLike = ".", validate=None, user: dict | None = None) -> dict:
    """Resolve ``config`` in place and return it.

    ``validate`` is snakemake.utils.validate; ``user`` is what the user gave on top of
    config.yaml (Snakemake's ``workflow.config_settings.overwrite_config``: --configfile and
    --config merged), used to replace rather than merge the open mappings.
    """
    base_dir = Path(base_dir)
    user = copy.deepcopy(user or {})
    load_env_file(base_dir / ".env")
    for section in FILE_SECTIONS:  # `file:` is documented per section; tolerate a missing section
        config.setdefault(section, {})
    merge_section_files(config, base_dir, user)
    apply_replacements(config, user)
    apply_env_overrides(config)
    if config.get("sweep") is None:  # null disables a sweep; the schema's defaults need a mapping
        config.pop("sweep", None)
    check_schema(config)
    if validate is None:
        from snakemake.utils import validate
    validate(config, str(SCHEMA_FILE))  # fills the schema's defaults in place
    config.setdefault("sweep", None)
    check_semantics(config)
    sort_keys({k: v for k, v in config.items() if k != "sweep"})  # a sweep's grid keeps its order
    return config


def revalidate(config: dict) -> dict:
    """Check an already resolved config again after keys were changed (a sweep point without
    its `sweep` section)."""
    check_schema(config)
    check_semantics(config)
    sort_keys(config)
    return config


def sort_keys(value) -> None:
    """Every mapping in key order, in place: params written with keys in another order are equal
    (Snakemake compares params by repr, so order alone would re-run a stage)."""
    if isinstance(value, dict):
        items = sorted(value.items())
        value.clear()
        value.update(items)
        for v in value.values():
            sort_keys(v)
    elif isinstance(value, list):
        for v in value:
            sort_keys(v)


def coerce_cli_strings(value, schema: dict):
    """`--config 'hub={dry_run: true}'` arrives as strings (Snakemake parses nested values with
    YAML's BaseLoader); turn them into the booleans/numbers/nulls the schema asks for."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            sub = props.get(k) or (extra if isinstance(extra, dict) else {})
            value[k] = coerce_cli_strings(v, sub)
        return value
    if isinstance(value, list):
        return [coerce_cli_strings(v, schema.get("items", {})) for v in value]
    if not isinstance(value, str):
        return value
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    lowered = value.strip().lower()
    if "null" in types and lowered in ("null", "~"):
        return None  # YAML's spellings of null (Snakemake reads nested --config values as text)
    if "string" in types:
        return value
    if "boolean" in types and lowered in ("true", "false"):
        return lowered == "true"
    for kind, cast in (("integer", int), ("number", float)):
        if kind in types:
            try:
                return cast(value)
            except ValueError:
                pass
    return value


@functools.cache
def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_FILE.read_text())


def check_schema(config: dict) -> None:
    """Validate against the schema; the error names the config key at fault."""
    import jsonschema

    schema = load_schema()
    coerce_cli_strings(config, schema)
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        return
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)' was unexpected", error.message)
        key = ".".join(filter(None, [path, extra[0] if extra else ""]))
        raise ConfigError(f"config key {key}: unknown key ({error.message})")
    raise ConfigError(f"config key {path or '(top level)'}: {error.message}")


def load_and_resolve(path: str | os.PathLike, overrides: dict | None = None) -> dict:
    """For tests and tools: read a config file, merge overrides the way Snakemake merges a
    --configfile into config.yaml, resolve."""
    from snakemake.utils import update_config

    config = yaml.safe_load(Path(path).read_text())
    update_config(config, copy.deepcopy(overrides or {}))  # deep, exactly as Snakemake merges
    return resolve(config, Path(path).parent, user=overrides)


def trainer_kwargs(training: dict) -> dict[str, Any]:
    """The SFTConfig part of the `training` section."""
    return {k: v for k, v in training.items() if k not in OWN_TRAINING_KEYS}


def lora_kwargs(peft: dict) -> dict[str, Any]:
    return {k: v for k, v in peft.items() if k not in OWN_PEFT_KEYS}


def model_name(model_cfg: dict) -> str:
    """Readable folder name: `model.name`, else a slug of `model.id` (checked safe)."""
    if model_cfg.get("name"):
        return check_safe_name(model_cfg["name"], "model.name")
    mid = model_cfg["id"]
    if mid.startswith("embedded:"):
        stem = mid.split(":", 1)[1]
    elif mid.endswith(".gguf") or Path(mid).exists():
        stem = Path(mid).name
    else:
        stem = mid.replace("/", "--")
    stem = re.sub(r"\.gguf$", "", stem)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.")
    if not SAFE_NAME_RE.fullmatch(slug):
        raise ConfigError(f"model.id: cannot derive a folder name from {mid!r}; set model.name")
    return slug


# model keys that change the prepared folder's content (trust_remote_code only allows loading)
MODEL_CONTENT_KEYS = ("id", "revision", "fallback_chat_template")


def model_dir(model_cfg: dict) -> str:
    """models/{name}-{key}: the key hashes every setting that changes the folder's content, so
    experiments with different settings never overwrite each other's base model."""
    content = json.dumps({k: model_cfg.get(k) for k in MODEL_CONTENT_KEYS}, sort_keys=True)
    key = hashlib.sha256(content.encode()).hexdigest()[:8]
    return f"models/{model_name(model_cfg)}-{key}"
