"""Config resolution: .env, `file:` sections, environment overrides, schema and key checks.

Called by the Snakefile at load time (before any job runs), and by tests. Loading must stay
fast (a no-op `snakemake -n` is expected in seconds), so the accepted TRL / PEFT keys are
read from ``trainer_keys.json`` (regenerate with ``python -m workflow_scripts.config
--write-keys``; a test checks it matches the installed libraries) rather than importing
TRL at every launch.
"""

import argparse
import copy
import difflib
import json
import os
import re
import string
from pathlib import Path
from typing import Any

import yaml

KEYS_FILE = Path(__file__).with_name("trainer_keys.json")
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


class ConfigError(ValueError):
    pass


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


def merge_section_files(config: dict, base_dir: Path) -> None:
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
        # The file is the user's explicit choice: its keys win over the section's defaults.
        sec.update(loaded)


def apply_env_overrides(config: dict) -> None:
    for var, (section, key) in ENV_OVERRIDES.items():
        if os.environ.get(var):
            config.setdefault(section, {})[key] = os.environ[var]


def allowed_trainer_keys() -> dict[str, list[str]]:
    return json.loads(KEYS_FILE.read_text())


def compute_trainer_keys() -> dict[str, list[str]]:
    import dataclasses

    from peft import LoraConfig
    from trl import SFTConfig

    return {
        "training": sorted(f.name for f in dataclasses.fields(SFTConfig) if f.init),
        "peft": sorted(f.name for f in dataclasses.fields(LoraConfig) if f.init),
    }


def _check_keys(section: str, given: dict, allowed: set[str], owner: str) -> None:
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{section}.{key}: not a {owner} field nor a snaketune key{hint}")


def check_semantics(config: dict) -> None:
    """Checks JSON schema cannot express; each names the key at fault."""
    keys = allowed_trainer_keys()
    _check_keys("training", config["training"], set(keys["training"]) | OWN_TRAINING_KEYS, "TRL SFTConfig")
    _check_keys("peft", config["peft"], set(keys["peft"]) | OWN_PEFT_KEYS, "PEFT LoraConfig")

    split = config["dataset"]["split"]
    total = split["train"] + split["validation"] + split["test"]
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(
            f"dataset.split: train + validation + test must sum to 1, got {total:g} "
            f"({split['train']} + {split['validation']} + {split['test']})"
        )

    check_messages_format(config["messages_format"], config["filters"])


def check_messages_format(mf: dict, filters: dict) -> None:
    """Templates use only defined placeholders; filters name only placeholders."""
    messages = mf["messages_format"]["messages"]
    if messages[-1]["role"] != "assistant":
        raise ConfigError(
            "messages_format.messages_format.messages: the last message must be the assistant's"
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
    names = ", ".join(sorted(mf["training_columns"]))
    for key in ("min_chars", "max_chars"):
        for name in filters.get(key) or {}:
            if name not in mf["training_columns"]:
                raise ConfigError(f"filters.{key}.{name}: not a placeholder name; names: {names}")


def resolve(config: dict, base_dir: str | os.PathLike = ".", validate=None) -> dict:
    """Resolve ``config`` in place and return it. ``validate`` is snakemake.utils.validate."""
    base_dir = Path(base_dir)
    load_env_file(base_dir / ".env")
    for section in FILE_SECTIONS:  # `file:` is documented per section; tolerate a missing section
        config.setdefault(section, {})
    merge_section_files(config, base_dir)
    apply_env_overrides(config)
    check_schema(config)
    if validate is None:
        from snakemake.utils import validate
    validate(config, str(SCHEMA_FILE))  # fills the schema's defaults in place
    check_semantics(config)
    return config


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
    if "string" in types:
        return value
    lowered = value.strip().lower()
    if "boolean" in types and lowered in ("true", "false"):
        return lowered == "true"
    if "null" in types and lowered in ("null", "none", "~"):
        return None
    for kind, cast in (("integer", int), ("number", float)):
        if kind in types:
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def check_schema(config: dict) -> None:
    """Validate against the schema; the error names the config key at fault."""
    import jsonschema

    schema = yaml.safe_load(SCHEMA_FILE.read_text())
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
    """For tests and tools: read a config file, deep-merge overrides, resolve."""
    config = yaml.safe_load(Path(path).read_text())
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **copy.deepcopy(value)}
        else:
            config[key] = copy.deepcopy(value)
    return resolve(config, Path(path).parent)


def trainer_kwargs(training: dict) -> dict[str, Any]:
    """The SFTConfig part of the `training` section."""
    return {k: v for k, v in training.items() if k not in OWN_TRAINING_KEYS}


def lora_kwargs(peft: dict) -> dict[str, Any]:
    return {k: v for k, v in peft.items() if k not in OWN_PEFT_KEYS}


def model_name(model_cfg: dict) -> str:
    """Folder name under models/: `model.name`, else a slug of `model.id`."""
    if model_cfg.get("name"):
        return model_cfg["name"]
    mid = model_cfg["id"]
    if mid.startswith("embedded:"):
        return mid.split(":", 1)[1]
    stem = Path(mid).name if (mid.endswith(".gguf") or Path(mid).exists()) else mid.replace("/", "--")
    stem = re.sub(r"\.gguf$", "", stem)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") or "model"


def main() -> None:
    parser = argparse.ArgumentParser(description="snaketune config utilities")
    parser.add_argument("--write-keys", action="store_true", help="regenerate trainer_keys.json")
    args = parser.parse_args()
    if args.write_keys:
        KEYS_FILE.write_text(json.dumps(compute_trainer_keys(), indent=1) + "\n")
        print(f"wrote {KEYS_FILE}")


if __name__ == "__main__":
    main()
