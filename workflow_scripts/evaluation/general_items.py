"""What the general-ability check measures: the items both models see, and the load-time checks.

Two kinds of measure, each per item so base and fine-tuned can be paired:

- `text_loss`: the mean next-token negative log-likelihood (nats per token) of prose passages
  from the documentation every Python install carries (`pydoc_data.topics`: the language
  reference's topics, English prose about Python). It needs no download. It is a loss, not a
  benchmark score: a rise means the model has drifted away from general English text (the way
  PEFT measures forgetting, cross-entropy on a general text sample).
- lm-evaluation-harness tasks (`general_ability.tasks`): registered task names (their data comes
  from the Hugging Face Hub at run time) or local task folders in lm-eval's own YAML format with
  local data files (nothing to download). Each per-item metric lm-eval logs (`acc`, `acc_norm`,
  ...) is one measure, named `{task}/{metric}`.

Load-time checks (`check_general_ability`, run once per load through checks.py): an unknown task
name is refused with close names; a Hub task without Hub access is refused naming the dataset;
a local folder with a broken YAML or data file is refused naming the file. No torch here.
"""

import contextlib
import difflib
import functools
import hashlib
import json
import os
import re
import sys
from pathlib import Path

from workflow_scripts.errors import ConfigError

# `datasets`' packaged builders: a task whose dataset_path is one of these reads local files.
PACKAGED_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "xml"})
# Passages shorter than this are headings, signatures or one-line notes, not prose.
MIN_PASSAGE_CHARS = 200
TEXT_SOURCE = "pydoc_data.topics (Python documentation prose)"


# --- the offline text measure -------------------------------------------------------------------


def prose_paragraphs() -> list[tuple[str, str]]:
    """(topic, paragraph) of every prose paragraph of pydoc_data.topics, in a fixed order: topics
    sorted by name, paragraphs as written. Code blocks (indented lines, `>>>`) and short lines
    (headings) are left out."""
    from pydoc_data.topics import topics

    out = []
    for topic in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[topic]):
            lines = block.strip("\n").split("\n")
            if any(line.startswith((" ", "\t", ">>>")) for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text) >= MIN_PASSAGE_CHARS and re.search(r"[a-z]{3} [a-z]{3}", text):
                out.append((topic, text))
    return out


def text_passages(n: int) -> list[dict]:
    """``n`` passages spread evenly over the prose paragraphs (all of them when fewer): the same
    selection for every model and every run on this Python version. Each has an id and the
    sha256 of its text, so a comparison can prove both models read the same passages."""
    paragraphs = prose_paragraphs()
    if n >= len(paragraphs):
        picked = list(range(len(paragraphs)))
    else:
        picked = sorted({round(i * (len(paragraphs) - 1) / max(n - 1, 1)) for i in range(n)})
    return [
        {
            "item": f"{paragraphs[i][0]}#{i}",
            "text": paragraphs[i][1],
            "hash": hashlib.sha256(paragraphs[i][1].encode()).hexdigest()[:16],
        }
        for i in picked
    ]


def python_version() -> str:
    """The passages come with the interpreter: a different minor version has different text."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


# --- lm-eval tasks --------------------------------------------------------------------------------


def is_local_task(spec: str) -> bool:
    """A path (a folder of task YAMLs or one YAML file) rather than a registered task name."""
    return "/" in spec or os.sep in spec or spec.endswith((".yaml", ".yml")) or Path(spec).exists()


def task_yaml_files(spec: str) -> list[Path]:
    """The YAML files of a local task folder (lm-eval indexes `*.yaml`), or the one file given."""
    path = Path(spec)
    if path.is_file():
        return [path]
    skip = {"__pycache__", ".ipynb_checkpoints"}
    return sorted(p for p in path.glob("**/*.yaml") if not skip & set(p.parts))


def read_task_yaml(path: Path) -> dict:
    """One task YAML as lm-eval reads it (without importing `!function` code); a broken file is
    one line naming it."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path, resolve_func=False)
    except (yaml.YAMLError, OSError, ValueError, TypeError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise ConfigError(
            f"general_ability.tasks: {path}: not a readable lm-eval task YAML ({first})"
        ) from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"general_ability.tasks: {path}: an lm-eval task YAML must be a mapping")
    return cfg


def data_files_of(cfg: dict, folder: Path) -> list[Path]:
    """The local data files a task reads (dataset_kwargs.data_files), relative paths resolved
    against the task's folder."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if not files:
        return []
    values = files.values() if isinstance(files, dict) else [files]
    out = []
    for v in values:
        for f in [v] if isinstance(v, str) else list(v):
            out.append(Path(f) if Path(f).is_absolute() else folder / f)
    return out


def check_data_file(path: Path, yaml_path: Path) -> None:
    """A data file exists and, for JSON / JSON lines, parses (the common way a file breaks): a
    whole JSON document, else rows read as the dataset stage reads them."""
    from workflow_scripts.data.sources import SourceError, row_batches

    if not path.is_file():
        raise ConfigError(
            f"general_ability.tasks: {yaml_path} names the data file {path}, which does not exist"
        )
    if path.suffix not in (".json", ".jsonl"):
        return
    with contextlib.suppress(ValueError):  # not JSON as a whole (or not UTF-8): read it as rows
        json.loads(path.read_text(encoding="utf-8"))
        return
    try:
        for _ in row_batches(path):  # every row parsed, a batch at a time
            pass
    except SourceError as exc:
        raise ConfigError(f"general_ability.tasks: {exc}") from None


def local_task_configs(spec: str) -> list[tuple[Path, dict]]:
    """(yaml file, config) of each task a local folder (or file) defines; checked."""
    path = Path(spec)
    if not path.exists():
        raise ConfigError(
            f"general_ability.tasks: {spec!r} is neither an lm-eval task name nor an existing path"
        )
    found = []
    for yaml_path in task_yaml_files(spec):
        cfg = read_task_yaml(yaml_path)
        if "task" not in cfg and "group" not in cfg and "include" not in cfg:
            raise ConfigError(f"general_ability.tasks: {yaml_path}: has no `task:` (or `group:`) name")
        found.append((yaml_path, cfg))
    if not any("task" in cfg for _, cfg in found):
        raise ConfigError(f"general_ability.tasks: {spec}: no lm-eval task YAML (`task: name`) in it")
    return found


def local_data_files(spec: str) -> list[str]:
    """Every file of a local task (its YAMLs, code, data): inputs of the general-ability jobs, so
    editing one re-runs them."""
    path = Path(spec)
    if path.is_file():
        folder = path.parent
        files = {path}
        for _, cfg in local_task_configs(spec):
            files.update(data_files_of(cfg, folder))
        return sorted(str(f) for f in files)
    return sorted(str(f) for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts)


@functools.cache
def task_input_files(specs: tuple[str, ...]) -> list[str]:
    """The files of every local task among ``specs`` (the general-ability jobs' inputs): listed
    once per planning, not once per job."""
    return sorted({f for spec in specs if is_local_task(spec) for f in local_data_files(spec)})


@functools.cache
def task_manager(include: str | None = None):
    """lm-eval's TaskManager: the registered tasks (indexing them takes seconds: built once per
    process), or only the tasks of one local folder."""
    from lm_eval.tasks import TaskManager

    if include is None:
        return TaskManager()
    return TaskManager(include_path=include, include_defaults=False)


def registered_tasks(spec: str) -> list[str]:
    """The registered leaf tasks a name or glob (`mmlu_*`) stands for; unknown ones are refused
    with the closest names."""
    tm = task_manager()
    matched = tm.match_tasks([spec]) if any(c in spec for c in "*?[") else [spec] * (spec in tm.all_tasks)
    if not matched:
        close = difflib.get_close_matches(spec, tm.all_tasks, n=5, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"general_ability.tasks: {spec!r} is not an lm-eval task, group or tag{hint}; "
            "a local task is a path to a folder of task YAMLs"
        )
    leaves = []
    for name in matched:
        entry = tm.task_index[name]
        if entry.kind.name in ("TASK", "PY_TASK"):
            leaves.append(name)
        else:  # a group or tag: its member tasks
            leaves.extend(_members(tm, name))
    return sorted(set(leaves))


def _members(tm, name: str) -> list[str]:
    """Leaf tasks of a group or tag, from the index (without building them: that downloads)."""
    entry = tm.task_index[name]
    if entry.kind.name == "TAG":
        return sorted(
            n for n, e in tm.task_index.items() if name in e.tags and e.kind.name in ("TASK", "PY_TASK")
        )
    out = []
    for child in (entry.cfg or {}).get("task") or []:
        child_name = child if isinstance(child, str) else child.get("task") or child.get("group")
        if isinstance(child_name, str) and child_name in tm.task_index:
            out.extend(
                [child_name]
                if tm.task_index[child_name].kind.name in ("TASK", "PY_TASK")
                else _members(tm, child_name)
            )
    return out


def hub_datasets(spec: str) -> dict[str, str]:
    """task -> the Hub dataset it downloads, for a registered name (or glob)."""
    tm = task_manager()
    out = {}
    for name in registered_tasks(spec):
        cfg = tm.task_index[name].cfg or {}
        path = cfg.get("dataset_path")
        if isinstance(path, str) and path not in PACKAGED_BUILDERS and not Path(path).exists():
            out[name] = path
    return out


def _offline() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def _cached(dataset: str) -> bool:
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}").is_dir()


@functools.cache
def hub_problem(dataset: str) -> str | None:
    """Why ``dataset`` cannot be downloaded from the Hub now (None when it can, or is cached)."""
    if _cached(dataset):
        return None
    if var := _offline():
        return f"{var} is set and it is not in the Hugging Face cache"
    from huggingface_hub import HfApi

    from workflow_scripts.credentials import hf_token

    try:
        HfApi().dataset_info(dataset, token=hf_token(), timeout=10)
    except Exception as exc:  # noqa: BLE001 - any failure means no access; the message says which
        first = " ".join(str(exc).split())[:160]
        return f"the Hugging Face Hub cannot be reached or refuses access ({type(exc).__name__}: {first})"
    return None


def check_local_task(spec: str) -> None:
    """A local task folder (or YAML file): readable YAMLs, existing and parseable data files, and
    Hub access where a local YAML still names a Hub dataset."""
    for yaml_path, cfg in local_task_configs(spec):
        for f in data_files_of(cfg, yaml_path.parent):
            check_data_file(f, yaml_path)
        dataset = cfg.get("dataset_path")
        if isinstance(dataset, str) and dataset not in PACKAGED_BUILDERS and "task" in cfg:
            if not Path(dataset).exists() and (why := hub_problem(dataset)):
                raise ConfigError(
                    f"general_ability.tasks: {yaml_path} reads {dataset} from the Hugging Face Hub, "
                    f"but {why}; point it at local data files (dataset_path: json)"
                )


def check_general_ability(section: dict) -> None:
    """Every task of ``general_ability.tasks`` can run: known names with Hub access, readable
    local folders. Cheap for local folders; a registered name costs indexing lm-eval's tasks
    (seconds, once per process)."""
    if not section["enabled"]:
        return
    if not section["tasks"] and not section["text_loss"]["enabled"]:
        raise ConfigError(
            "general_ability: enabled, but text_loss is off and tasks is empty (nothing to measure); "
            "set general_ability.enabled: false to skip the check"
        )
    seen = set()
    for spec in section["tasks"]:
        if spec in seen:
            raise ConfigError(f"general_ability.tasks: {spec!r} is listed twice")
        seen.add(spec)
        if is_local_task(spec):
            check_local_task(spec)
            continue
        for task, dataset in hub_datasets(spec).items():
            if why := hub_problem(dataset):
                raise ConfigError(
                    f"general_ability.tasks: {spec!r} (task {task}) downloads {dataset} from the Hugging Face "
                    f"Hub, but {why}. Use a local task folder instead (README: General ability)"
                )
