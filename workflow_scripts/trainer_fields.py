"""Names and value types of the TRL ``SFTConfig`` / PEFT ``LoraConfig`` fields snaketune passes through.

``compute()`` reads them from the installed libraries (slow: imports TRL and torch); the result is
stored in ``trainer_keys.json`` (regenerate with ``python -m workflow_scripts.trainer_fields
--write``; a test checks it matches the installed libraries) so that config loading can check
key names and values without importing TRL.

snaketune's own keys in those sections (``OWN_KEYS``) are known here too: ``problems`` checks
a section, ``trainer_kwargs`` / ``lora_kwargs`` give what is passed to the library.

Each field maps to ``"any"`` (annotation too complex to check honestly: left to the library) or
``{"types": [...], "enum": [...], "items": spec}`` with JSON type names: a value passes if its
type is listed (an integer also passes as a number), a string is one of ``enum`` when given,
and each element of a list matches ``items`` when given.
"""

import argparse
import difflib
import enum
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any

from workflow_scripts import layout

KEYS_FILE = Path(__file__).with_name("trainer_keys.json")
# snaketune's own keys inside `training` / `peft` (everything else must be a TRL / PEFT field).
OWN_TRAINING_KEYS = {
    "file",
    "overlength",
    "early_stopping_patience",
    "num_processes",
    "nodes",
    "master_port",
    "accelerate_config",
    "fast_path",
}
OWN_PEFT_KEYS = {"file"}
OWN_KEYS = {"training": OWN_TRAINING_KEYS, "peft": OWN_PEFT_KEYS}
# TRL / Trainer fields snaketune sets itself, or whose work it does itself -> what to use instead.
# They are refused at load: passing them would be ignored (or clash with what the stage sets).
MANAGED_TRAINING_KEYS = {
    "output_dir": f"checkpoints go to {layout.checkpoints('{experiment}')}",
    "resume_from_checkpoint": "a re-run resumes from the newest complete checkpoint by itself",
    "remove_unused_columns": "snaketune's collator needs its columns",
    "dataset_kwargs": "format_dataset prepares the data; the trainer does not",
    "dataset_text_field": "format_dataset prepares the data; the trainer does not",
    "dataset_num_proc": "format_dataset prepares the data; the trainer does not",
    "use_cpu": "the device follows resources.gpu",
    "disable_tqdm": "the rule's log always shows a progress bar",
    "packing": "use training.fast_path.packing",
    "padding_free": "batches are length-grouped (training.fast_path.group_by_length)",
    "completion_only_loss": "the loss is always on assistant tokens only",
    "assistant_only_loss": "the loss is always on assistant tokens only",
    "chat_template_path": "the chat template is the base model's (model.fallback_chat_template when it has none)",
    "eos_token": "the base model's tokenizer defines it",
    "pad_token": "the base model's tokenizer defines it",
}
LIBRARY_CLASSES = {"training": "TRL SFTConfig", "peft": "PEFT LoraConfig"}
ANY = "any"
_SCALARS = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    type(None): "null",
    dict: "object",
    list: "array",
}
_DESCRIBE = {
    "boolean": "a boolean (true/false)",
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "null": "null",
    "object": "a mapping",
    "array": "a list",
}


# ---------------------------------------------------------------- deriving specs (imports TRL)


def _members(annotation) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def spec_of(annotation) -> dict | str:
    """The JSON spec of one field annotation, or ``"any"``."""
    kinds, choices, item_specs = set(), [], []
    plain_str = has_enum = open_literal = False
    for member in _members(annotation):
        origin = typing.get_origin(member)
        if isinstance(member, type) and issubclass(member, enum.Enum):
            # HF / PEFT convention: `SomeEnum | str` means the enum or its string value, and the
            # library converts (SchedulerType(value) raises on anything else).
            values = [m.value for m in member]
            if not all(isinstance(v, str) for v in values):
                return ANY
            kinds.add("string")
            choices += values
            has_enum = True
        elif member in _SCALARS:
            kinds.add(_SCALARS[member])
            plain_str |= member is str
        elif origin is dict:
            kinds.add("object")
        elif origin is list:
            kinds.add("array")
            (item,) = typing.get_args(member)
            item_specs.append(spec_of(item))
        elif origin is typing.Literal:
            for value in typing.get_args(member):
                if isinstance(value, str):
                    kinds.add("string")
                    # A placeholder such as 'pissa_niter_[number of iters]' describes a family of
                    # strings: the Literal is documentation, not a closed set.
                    open_literal |= "[" in value
                    choices.append(value)
                elif type(value) in _SCALARS:  # Literal[False] is recorded as any boolean
                    kinds.add(_SCALARS[type(value)])
                else:
                    return ANY
        else:  # typing.Any, dataclasses (LoftQConfig, ParallelismConfig, ...), tuples
            return ANY
    spec: dict = {"types": sorted(kinds)}
    if choices and not open_literal and (has_enum or not plain_str):
        spec["enum"] = list(dict.fromkeys(choices))  # declaration order, as the library lists them
    simple_items = [s for s in item_specs if s != ANY and "items" not in s]
    if (
        simple_items
        and len(simple_items) == len(item_specs)
        and all(s == simple_items[0] for s in simple_items)
    ):
        spec["items"] = simple_items[0]
    return spec


def _dataclass_specs(cls) -> dict:
    import dataclasses

    hints = typing.get_type_hints(cls)
    return {
        f.name: spec_of(hints[f.name])
        for f in sorted(dataclasses.fields(cls), key=lambda f: f.name)
        if f.init
    }


def compute() -> dict:
    """``{"training": {field: spec}, "peft": {field: spec}}`` from the installed TRL and PEFT."""
    from peft import LoraConfig
    from trl import SFTConfig

    return {"training": _dataclass_specs(SFTConfig), "peft": _dataclass_specs(LoraConfig)}


def dumps(specs: dict) -> str:
    """Deterministic JSON, one field per line (readable diffs on library upgrades)."""
    sections = []
    for section in sorted(specs):
        fields = specs[section]
        lines = [
            f"  {json.dumps(name)}: {json.dumps(fields[name], sort_keys=True)}" for name in sorted(fields)
        ]
        sections.append(f" {json.dumps(section)}: {{\n" + ",\n".join(lines) + "\n }")
    return "{\n" + ",\n".join(sections) + "\n}\n"


# ---------------------------------------------------------------- checking (cheap, no TRL)


@functools.cache
def load() -> dict:
    return json.loads(KEYS_FILE.read_text())


def allowed_keys() -> dict[str, set[str]]:
    return {section: set(fields) for section, fields in load().items()}


def _show(value) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return repr(value)


def _json_type(value) -> str | None:
    for cls, name in _SCALARS.items():  # bool before int: True is not an integer here
        if isinstance(value, cls):
            return name
    return None


def _problem(value, spec, where: str) -> str | None:
    if spec == ANY:
        return None
    kinds, choices = spec["types"], spec.get("enum")
    kind = _json_type(value)
    if kind in kinds or (kind == "integer" and "number" in kinds):
        if kind == "string" and choices and value not in choices:
            close = difflib.get_close_matches(value, choices, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            return f"{where}: {value!r} is not one of {', '.join(choices)}{hint}"
        if kind == "array" and "items" in spec:
            for i, item in enumerate(value):
                if problem := _problem(item, spec["items"], f"{where}[{i}]"):
                    return problem
        return None
    if choices and set(kinds) <= {"string", "null"}:
        null = ", or null" if "null" in kinds else ""
        yaml_hint = ""
        if isinstance(value, bool) and {"no", "yes", "on", "off"} & set(choices):
            yaml_hint = " (YAML reads unquoted no/yes/on/off as booleans: quote the word)"
        return f"{where}: {_show(value)} is not one of {', '.join(choices)}{null}{yaml_hint}"
    wanted = " or ".join(
        f"one of {', '.join(choices)}" if k == "string" and choices else _DESCRIBE[k] for k in kinds
    )
    got = f"the string {value!r}" if kind == "string" else _show(value)
    return f"{where}: expected {wanted}, got {got}"


def max_steps_problem(training: dict) -> str | None:
    """TRL reads max_steps <= 0 as "train by epochs": only its unset value -1 may say so."""
    steps = training.get("max_steps")
    if _json_type(steps) == "integer" and (steps == 0 or steps < -1):
        return (
            f"training.max_steps: must be a positive number of steps (or -1 / absent to train "
            f"for num_train_epochs), got {steps}"
        )
    return None


def problems(section: str, values: dict) -> list[str]:
    """What is wrong in ``section`` (`training` or `peft`), one line each, naming the key: a key
    that is neither a field of the library's class nor snaketune's own, a field snaketune sets
    itself (MANAGED_TRAINING_KEYS), then a passed-through value the field does not accept.
    Empty when all is well (config.py raises on the first)."""
    own, specs = OWN_KEYS[section], load()[section]
    found = []
    for key in values:
        if key not in own and key not in specs:
            close = difflib.get_close_matches(key, sorted(own | set(specs)), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            found.append(f"{section}.{key}: not a {LIBRARY_CLASSES[section]} field nor a snaketune key{hint}")
    if section == "training":  # refused, not dropped at train time
        found += [
            f"training.{key}: set by snaketune itself ({MANAGED_TRAINING_KEYS[key]}); remove it"
            for key in values
            if key in MANAGED_TRAINING_KEYS
        ]
    for key, value in values.items():
        if key in specs and key not in own and (problem := _problem(value, specs[key], f"{section}.{key}")):
            found.append(problem)
    if section == "training" and (problem := max_steps_problem(values)):
        found.append(problem)
    return found


def trainer_kwargs(training: dict) -> dict[str, Any]:
    """The SFTConfig part of the `training` section."""
    return {k: v for k, v in training.items() if k not in OWN_TRAINING_KEYS}


def lora_kwargs(peft: dict) -> dict[str, Any]:
    """The LoraConfig part of the `peft` section."""
    return {k: v for k, v in peft.items() if k not in OWN_PEFT_KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"regenerate {KEYS_FILE.name}")
    args = parser.parse_args()
    text = dumps(compute())
    if args.write:
        KEYS_FILE.write_text(text)
        load.cache_clear()
        print(f"wrote {KEYS_FILE}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
