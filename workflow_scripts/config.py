"""Config resolution: .env, `file:` sections, environment overrides, schema defaults, CLI coercion.

What a valid config *means* is checked elsewhere, in one direction: the secret scan in
credentials.py (first, so no later message quotes a secret), the schema here, then every semantic
check in checks.py. Errors are errors.ConfigError.

Called by the Snakefile at load time (before any job runs), and by tests. Loading must stay
fast (a no-op `snakemake -n` is expected in seconds), so the accepted TRL / PEFT keys and
their value types are read from ``trainer_keys.json`` (trainer_fields.py; regenerate with
``python -m workflow_scripts.trainer_fields --write``; a test checks it matches the installed
libraries) rather than importing TRL at every launch.
"""

import copy
import functools
import os
import re
import sys
from pathlib import Path

import yaml

from workflow_scripts import checks
from workflow_scripts.credentials import check_no_secrets
from workflow_scripts.errors import ConfigError

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"

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
    check_no_secrets(config)  # first: later error messages quote values
    check_schema(config)
    if validate is None:
        from snakemake.utils import validate
    validate(config, str(SCHEMA_FILE))  # fills the schema's defaults in place
    config.setdefault("sweep", None)
    checks.check_semantics(config)
    checks.check_general_ability(config["general_ability"])  # once per load: not a sweepable section
    sort_keys({k: v for k, v in config.items() if k != "sweep"})  # a sweep's grid keeps its order
    return config


def revalidate(config: dict) -> dict:
    """Check an already resolved config again after keys were changed (a sweep point without
    its `sweep` section)."""
    check_no_secrets(config)
    check_schema(config)
    checks.check_semantics(config)
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


def schema_node(key: str) -> dict:
    """The schema's node of a dotted config key (``export.tolerances.q8_0``)."""
    node = load_schema()
    for part in key.split("."):
        node = node.get("properties", {}).get(part)
        if node is None:
            raise KeyError(f"{key}: not a key of {SCHEMA_FILE.name}")
    return node


def schema_default(key: str):
    """The schema's default of a dotted config key (``evaluation.max_new_tokens``): code that needs
    a config default outside a resolved config reads it here instead of restating it."""
    node = schema_node(key)
    if "default" not in node:
        raise KeyError(f"{key}: has no default in {SCHEMA_FILE.name}")
    return copy.deepcopy(node["default"])


def check_schema(config: dict) -> None:
    """Validate against the schema; the error names the config key at fault."""
    import jsonschema

    schema = load_schema()
    coerce_cli_strings(config, schema)
    checks.check_finite(config)  # NaN passes every `minimum`; one message for every non-finite number
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
