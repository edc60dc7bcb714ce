"""The data stages as they were before streaming (commit f124a227f677fb221c5077eb417cfa7599b94283,
`workflow_scripts/data/{download_dataset,sources,preprocess_dataset,format_dataset}.py` and
`files.read_jsonl`/`write_jsonl`/`write_parquet`), kept as the reference the streamed stages must
reproduce (tests/test_streaming.py).

Each stage read whole splits into memory. The logic is copied here, not imported: reading rows,
carving, filtering and de-duplication, rendering, tokenizing and the stats. Only what does not
change meaning is imported from the repository: which local files feed which split
(`local_split_files`), the carving rule (`carve_counts`), the split vocabulary, template
rendering, config checks and model loading.

Plain functions, no files written; what each returns is what the next legacy stage read back:

- ``legacy_download(cfg)`` -> ({split: DataFrame as read back from its parquet}, sources.json's record)
- ``legacy_preprocess(frames, mf, filters)`` -> ({split: [row dict]}, report.json's content)
- ``legacy_format(rows_by_split, model_dir, fmt)`` -> ({split: [row dict]}, stats.json's content)
"""

import hashlib
import io
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from workflow_scripts.checks import check_messages_format
from workflow_scripts.data.sources import (
    SPLIT_KEYWORDS,
    SourceError,
    carve_counts,
    local_split_files,
)
from workflow_scripts.data.sources import (
    is_local_dataset as looks_local,
)
from workflow_scripts.data.templates import render_template
from workflow_scripts.errors import ConfigError
from workflow_scripts.stage import StageError

LEGACY_COMMIT = "f124a227f677fb221c5077eb417cfa7599b94283"
SPLITS = ("train", "validation", "test")
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
HUB_ALIASES = {word: split for split, words in SPLIT_KEYWORDS.items() for word in words}


def _json_file(data):
    """What `files.write_json` wrote, read back."""
    return json.loads(json.dumps(data, indent=2, default=str))


# --- sources.py: reading every cell as the text written in the file ----------------------------


class _Written(str):
    """A JSON number kept as the text it was written as."""


def _json_text(value) -> str:
    if isinstance(value, _Written):
        return str(value)
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_json_text(v)}" for k, v in value.items())
            + "}"
        )
    if isinstance(value, list):
        return "[" + ", ".join(_json_text(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _as_text(value):
    if value is None:
        return None
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (dict, list)):
        return _json_text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SourceError(
            f"dataset file {path}: not UTF-8 (byte 0x{data[exc.start]:02x} on line {line}); "
            "re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`"
        ) from None


def read_json_rows(path: Path) -> list[dict]:
    text = _decode(path)
    keep = {"parse_float": _Written, "parse_int": _Written}
    if not text.strip():
        raise SourceError(f"dataset file {path}: the file is empty (no rows)")
    if path.suffix.lower() == ".json" and text.lstrip()[:1] == "[":
        try:
            rows = json.loads(text, **keep)
        except json.JSONDecodeError as exc:
            raise SourceError(f"dataset file {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        where = [f"item {i}" for i in range(len(rows))]
    else:
        rows, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line, **keep))
                except json.JSONDecodeError as exc:
                    raise SourceError(
                        f"dataset file {path}: line {n} is not valid JSON ({exc.msg})"
                    ) from None
                where.append(f"line {n}")
    for row, at in zip(rows, where, strict=True):
        if not isinstance(row, dict):
            raise SourceError(
                f"dataset file {path}: {at} is a {type(row).__name__}, not an object of columns"
            )
    if not rows:
        raise SourceError(f"dataset file {path}: no rows")
    return [{k: _as_text(v) for k, v in row.items()} for row in rows]


def _read_csv(path: Path) -> list[dict]:
    text = _decode(path)
    if not text.strip():
        raise SourceError(f"dataset file {path}: the file is empty (no rows)")
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise SourceError(f"dataset file {path}: not a readable CSV ({exc})") from None
    if frame.empty:
        raise SourceError(f"dataset file {path}: a header but no rows")
    return [{k: (None if pd.isna(v) else v) for k, v in r.items()} for r in frame.to_dict("records")]


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:
        raise SourceError(f"dataset file {path}: not a readable parquet file ({exc})") from None
    if not rows:
        raise SourceError(f"dataset file {path}: no rows")
    return [{k: _as_text(v) for k, v in row.items()} for row in rows]


READERS = {"json": read_json_rows, "csv": _read_csv, "parquet": _read_parquet}


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    return READERS[FORMATS[path.suffix.lower()]](path)


def rows_as_text(records: list[dict]) -> list[dict]:
    return [{k: _as_text(v) for k, v in row.items()} for row in records]


# --- download_dataset.py ----------------------------------------------------------------------


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_local(cfg: dict) -> tuple[dict[str, pd.DataFrame], dict]:
    files_record: dict[str, list[dict]] = {}
    frames = {}
    try:
        by_split, how = local_split_files(cfg)
        for split, files in by_split.items():
            rows = []
            for f in files:
                file_rows = read_rows(f)
                rows.extend(file_rows)
                entry = {"path": f, "sha256": _sha256(f), "rows": len(file_rows)}
                if os.path.realpath(f) != os.path.abspath(f):
                    entry["resolved"] = os.path.realpath(f)
                files_record.setdefault(split, []).append(entry)
            frames[split] = pd.DataFrame(rows, dtype=object)
    except SourceError as exc:
        raise StageError(str(exc)) from None
    return frames, {"source": "local", "found_by": how, "files": files_record}


def load_hub(cfg: dict) -> tuple[dict[str, pd.DataFrame], dict]:
    import datasets

    from workflow_scripts.credentials import hf_token

    dataset_id = cfg["id"]
    try:
        source = datasets.load_dataset(
            dataset_id,
            name=cfg["config"],
            revision=cfg["revision"],
            data_files=cfg["data_files"],
            token=hf_token(),
        )
    except Exception as exc:
        raise StageError(
            f"dataset.id: could not load Hub dataset {dataset_id!r} ({type(exc).__name__}: {exc}). "
            "If the Hub is unreachable, download the data elsewhere and point dataset.id at a local "
            "json/jsonl/csv/parquet file or folder (e.g. --config dataset.id=data/my_data.jsonl)."
        ) from exc
    names = cfg["split_names"]
    if names:
        wanted = {ours: theirs for ours, theirs in names.items() if theirs}
        for ours, theirs in wanted.items():
            if theirs not in source:
                raise StageError(
                    f"dataset.split_names.{ours}: {dataset_id} has no split {theirs!r} (splits: {sorted(source)})"
                )
    else:
        wanted = {}
        for theirs in source:
            ours = HUB_ALIASES.get(theirs.lower())
            if ours is None:
                continue
            if ours in wanted:
                raise StageError(
                    f"dataset.id: {dataset_id} has splits {wanted[ours]!r} and {theirs!r} that both mean "
                    f"{ours}; choose one with dataset.split_names.{ours}"
                )
            wanted[ours] = theirs
    frames = {
        ours: pd.DataFrame(rows_as_text(source[theirs].to_list()), dtype=object)
        for ours, theirs in wanted.items()
    }
    if "train" not in frames:
        raise StageError(
            f"dataset.id: {dataset_id} has no train split (splits: {sorted(source)}); "
            "map one with dataset.split_names.train"
        )
    record = {
        "source": "hub",
        "id": dataset_id,
        "config": cfg["config"],
        "revision": cfg["revision"],
        "splits": wanted,
    }
    return frames, record


def make_splits(frames: dict[str, pd.DataFrame], cfg: dict) -> tuple[dict[str, pd.DataFrame], dict]:
    """Keep the splits the source has; carve only the missing ones out of train."""
    ratios, seed = cfg["split"], cfg["split"]["seed"]
    order = np.random.default_rng(seed).permutation(len(frames["train"]))
    train = frames["train"].iloc[order].reset_index(drop=True)
    named = {s: f for s, f in frames.items() if s != "train"}
    missing = [s for s in ("validation", "test") if s not in named]
    carved = {}
    if missing:
        total = ratios["train"] + sum(ratios[s] for s in missing)
        counts, start = carve_counts(len(train), ratios, missing), 0
        for s in missing:
            k = counts[s]
            named[s] = train.iloc[start : start + k].reset_index(drop=True)
            carved[s] = {"rows": k, "share_of_train_pool": round(ratios[s] / total, 6)}
            start += k
        train = train.iloc[start:].reset_index(drop=True)
    named["train"] = train
    if cfg["max_rows"]:
        named = {s: f.iloc[: cfg["max_rows"]] for s, f in named.items()}
    for s in SPLITS:
        if len(named[s]) == 0:
            raise StageError(
                f"dataset.split.{s}: the {s} split is empty (ratios {dict(ratios)}, train rows {len(train)})"
            )
    return named, {"carved_from_train": carved, "seed": seed, "max_rows": cfg["max_rows"]}


def _parquet_round_trip(frame: pd.DataFrame) -> pd.DataFrame:
    """What `files.write_parquet` wrote and `pd.read_parquet` read back."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    buf.seek(0)
    return pd.read_parquet(buf)


def legacy_download(cfg: dict) -> tuple[dict[str, pd.DataFrame], dict]:
    """({split: frame as read back from `{split}.parquet`}, the content of `sources.json`)."""
    frames, record = load_local(cfg) if looks_local(cfg["id"]) else load_hub(cfg)
    splits, carving = make_splits(frames, cfg)
    counts = {s: len(splits[s]) for s in SPLITS}
    written = {s: _parquet_round_trip(splits[s]) for s in SPLITS}
    return written, _json_file({**record, **carving, "rows": counts})


# --- preprocess_dataset.py --------------------------------------------------------------------


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def check_columns(frame: pd.DataFrame, split: str, mf: dict) -> None:
    columns = list(frame.columns)
    wanted = [(f"messages_format.training_columns.{k}", c) for k, c in mf["training_columns"].items()]
    wanted += [(f"messages_format.metadata_columns[{i}]", c) for i, c in enumerate(mf["metadata_columns"])]
    if split == "test":
        wanted += [(f"messages_format.evaluate_columns.{k}", c) for k, c in mf["evaluate_columns"].items()]
    for key, column in wanted:
        if column not in frame.columns:
            raise StageError(
                f"{key}: column {column!r} is not in the {split} data; its columns are {columns}"
            )


def check_templates(mf: dict, filters: dict) -> None:
    try:
        check_messages_format(mf, filters)
    except ConfigError as exc:
        raise StageError(str(exc)) from None


def build_messages(templates: list[dict], values: dict[str, str]) -> list[dict]:
    return [{"role": m["role"], "content": render_template(m["content"], values)} for m in templates]


def preprocess_split(
    frame: pd.DataFrame,
    split: str,
    mf: dict,
    filters: dict,
    seen_train_prompts: set[str] | None = None,
) -> tuple[list[dict], dict, set[str]]:
    templates = mf["messages_format"]["messages"]
    system_prompt = mf["messages_format"]["system_prompt"] or ""
    answer_re = re.compile(filters["answer_regex"]) if filters["answer_regex"] else None
    ref_col = mf["evaluate_columns"]["response"]
    dropped: Counter = Counter()
    seen: set[str] = set()
    rows = []
    for record in frame.to_dict("records"):
        values = {name: _text(record[col]) for name, col in mf["training_columns"].items()}
        reason = None
        if filters["drop_empty"]:
            reason = next((f"empty:{n}" for n, v in values.items() if not v.strip()), None)
        for name, limit in (filters["min_chars"] or {}).items():
            reason = reason or (f"too_short:{name}" if len(values[name]) < limit else None)
        for name, limit in (filters["max_chars"] or {}).items():
            reason = reason or (f"too_long:{name}" if len(values[name]) > limit else None)
        reference = _text(record.get(ref_col)) if ref_col in record else ""
        if not reason and answer_re is not None and not answer_re.search(reference):
            reason = "answer_regex"
        values["system_prompt"] = system_prompt
        messages = build_messages(templates, values)
        prompt_key = normalise("\n".join(m["content"] for m in messages if m["role"] == "user"))
        if not reason and filters["deduplicate_prompts"]:
            if prompt_key in seen:
                reason = "duplicate_prompt"
            elif seen_train_prompts is not None and prompt_key in seen_train_prompts:
                reason = "duplicate_of_train"
        if reason:
            dropped[reason] += 1
            continue
        seen.add(prompt_key)
        meta = {c: _text(record[c]) for c in mf["metadata_columns"]}
        if split == "test":
            last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            rows.append(
                {
                    "messages": messages[:last_assistant],
                    "query": _text(record[mf["evaluate_columns"]["query"]]),
                    "reference": reference,
                    "target": messages[last_assistant]["content"],
                    "meta": meta,
                }
            )
        else:
            rows.append({"messages": messages, "meta": meta})
    report = {"rows_in": len(frame), "rows_kept": len(rows), "dropped": dict(sorted(dropped.items()))}
    if not rows:
        raise StageError(
            f"preprocess_dataset: every row of the {split} split was filtered out "
            f"(reasons: {dict(dropped)}); check the `filters` section and the column mapping"
        )
    return rows, report, seen


def legacy_preprocess(frames: dict[str, pd.DataFrame], mf: dict, filters: dict) -> tuple[dict, dict]:
    """({split: rows as read back from `{split}.jsonl`}, the content of `report.json`)."""
    check_templates(mf, filters)
    for s in SPLITS:
        check_columns(frames[s], s, mf)
    results, report, train_prompts = {}, {}, None
    for s in SPLITS:
        rows, report[s], seen = preprocess_split(frames[s], s, mf, filters, train_prompts)
        if s == "train":
            train_prompts = seen
        # write_jsonl then read_jsonl
        results[s] = [json.loads(json.dumps(row, ensure_ascii=False)) for row in rows]
    return results, _json_file(report)


# --- format_dataset.py ------------------------------------------------------------------------


def render_example(formatter, messages: list[dict]) -> tuple[str, str]:
    prompt = formatter.render(messages[:-1], add_generation_prompt=True)
    full = formatter.render(messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise StageError(
            "format_dataset: the chat template renders the prompt differently inside the full conversation "
            f"(prompt {prompt[-80:]!r} is not a prefix of the conversation); training and evaluation would "
            "see different prompts. Use a prefix-consistent template (model.fallback_chat_template)."
        )
    return prompt, full[len(prompt) :]


def tokenize(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def percentiles(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    arr = np.asarray(lengths)
    return {
        "count": int(arr.size),
        "mean": round(float(arr.mean()), 1),
        **{f"p{q}": int(np.percentile(arr, q)) for q in (50, 90, 95, 99)},
        "max": int(arr.max()),
    }


def format_train_split(
    rows: list[dict], formatter, tok, max_length: int, overlength: str
) -> tuple[list, dict]:
    out, lengths = [], []
    stats = {"over_max_length": 0, "dropped": 0, "truncated": 0}
    for row in rows:
        messages = row["messages"]
        prompt, completion = render_example(formatter, messages)
        prompt_ids, completion_ids = tokenize(tok, prompt), tokenize(tok, completion)
        n = len(prompt_ids) + len(completion_ids)
        lengths.append(n)
        if n > max_length:
            stats["over_max_length"] += 1
            if overlength == "drop" or len(prompt_ids) >= max_length:
                stats["dropped"] += 1
                continue
            completion_ids = completion_ids[: max_length - len(prompt_ids)]
            stats["truncated"] += 1
        out.append(
            {
                "messages": json.dumps(messages, ensure_ascii=False),
                "prompt_text": prompt,
                "completion_text": completion,
                "input_ids": prompt_ids + completion_ids,
                "prompt_length": len(prompt_ids),
                "meta": json.dumps(row.get("meta") or {}),
            }
        )
    stats["tokens"] = percentiles(lengths)
    stats["rows"] = len(out)
    return out, stats


def format_test_split(rows: list[dict], formatter, tok) -> tuple[list, dict]:
    out, lengths = [], []
    for row in rows:
        prompt = formatter.render(row["messages"], add_generation_prompt=True)
        n = len(tokenize(tok, prompt))
        lengths.append(n)
        out.append(
            {
                "messages": json.dumps(row["messages"], ensure_ascii=False),
                "prompt_text": prompt,
                "prompt_length": n,
                "query": row.get("query", ""),
                "reference": row["reference"],
                "target": row.get("target", ""),
                "meta": json.dumps(row.get("meta") or {}),
            }
        )
    return out, {"rows": len(out), "prompt_tokens": percentiles(lengths)}


def legacy_format(rows_by_split: dict[str, list[dict]], model_dir, fmt: dict) -> tuple[dict, dict]:
    """({split: rows of `{split}.parquet`, columns in file order}, the content of `stats.json`)."""
    from workflow_scripts.models.loading import load_chat_formatter, load_tokenizer

    formatter = load_chat_formatter(model_dir)
    tok = load_tokenizer(model_dir)
    manifest_path = Path(model_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    results, stats = {}, {"max_length": fmt["max_length"], "overlength": fmt["overlength"]}
    stats["chat_template"] = manifest.get("chat_template", "model")
    for split in ("train", "validation"):
        rows = rows_by_split[split]
        results[split], stats[split] = format_train_split(
            rows, formatter, tok, fmt["max_length"], fmt["overlength"]
        )
        if not results[split]:
            raise StageError(
                f"training.max_length: all {len(rows)} {split} rows are longer than {fmt['max_length']} tokens "
                f"({stats[split]['tokens']}); raise training.max_length or set training.overlength: truncate"
            )
    rows = rows_by_split["test"]
    if not rows:
        raise StageError("format_dataset: the test split is empty")
    results["test"], stats["test"] = format_test_split(rows, formatter, tok)
    return results, _json_file(stats)
