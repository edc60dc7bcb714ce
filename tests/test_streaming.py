"""The streamed data stages produce exactly what the whole-split stages produced.

Each case runs download_dataset -> preprocess_dataset -> format_dataset through their ``run(job)``
entries with tiny batches (``sources.BATCH_ROWS``), so every split crosses several batch
boundaries, and compares every output with the reference in tests/legacy_data_stages.py (the
stages as they were before streaming). format_dataset runs with 1 and 2 worker processes.

Rows are read with pyarrow (``to_pylist``): cells come back as plain ``str``/``None``/``int``, with
no pandas dtype inference between the file and the comparison.
"""

import json
import os
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, sample_rows
from legacy_data_stages import legacy_download, legacy_format, legacy_preprocess

from workflow_scripts.data import download_dataset, format_dataset, preprocess_dataset, sources
from workflow_scripts.data.sources import SourceError
from workflow_scripts.layout import format_settings
from workflow_scripts.stage import Job, StageError

SPLITS = ("train", "validation", "test")
Q = "Open-ended Verifiable Question"


def small_batches(monkeypatch, rows: int) -> None:
    """Every data stage reads sources.BATCH_ROWS when it runs; each split here spans several
    batches. No raising=False: a stage that no longer reads it would run in one batch and prove
    nothing."""
    monkeypatch.setattr(sources, "BATCH_ROWS", rows)


# --- the new stages, run as their rules run them --------------------------------------------


def run_download(cfg: dict, root: Path) -> dict:
    out = {s: str(root / "raw" / f"{s}.parquet") for s in SPLITS}
    out["sources"] = str(root / "raw" / "sources.json")
    download_dataset.run(Job(output=out, params={"dataset": cfg}))
    return out


def run_preprocess(raw: dict, root: Path, mf: dict, filters: dict) -> dict:
    out = {s: str(root / "pre" / f"{s}.parquet") for s in SPLITS}
    out["report"] = str(root / "pre" / "report.json")
    job = Job(
        input={s: raw[s] for s in SPLITS},
        output=out,
        params={"messages_format": mf, "filters": filters},
    )
    preprocess_dataset.run(job)
    return out


def run_format(pre: dict, model_dir, folder: Path, fmt: dict, threads: int) -> dict:
    out = {s: str(folder / f"{s}.parquet") for s in SPLITS}
    out.update({f"{s}_tokens": str(folder / f"{s}.tokens.arrow") for s in ("train", "validation")})
    out["stats"] = str(folder / "stats.json")
    job = Job(
        input={**{s: pre[s] for s in SPLITS}, "model_dir": str(model_dir)},
        output=out,
        params={"format": fmt},
        threads=threads,
    )
    format_dataset.run(job)
    return out


# --- comparisons ----------------------------------------------------------------------------


def _short(value, n=300) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def assert_same_rows(new: list[dict], old: list[dict], what: str) -> None:
    assert len(new) == len(old), f"{what}: {len(new)} rows, legacy {len(old)}"
    for i, (a, b) in enumerate(zip(new, old, strict=True)):
        if a != b:
            diff = {
                k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in {**a, **b} if a.get(k) != b.get(k)
            }
            pytest.fail(
                f"{what}: row {i} differs (new, legacy): "
                + "; ".join(f"{k}: {_short(n)} != {_short(o)}" for k, (n, o) in diff.items())
            )


def frame_cells(frame: pd.DataFrame) -> list[dict]:
    """A legacy frame's rows with missing cells as None (pandas reads them as NaN or None)."""
    return [
        {k: (None if not isinstance(v, str) and pd.isna(v) else v) for k, v in row.items()}
        for row in frame.to_dict("records")
    ]


def json_file(path) -> dict:
    return json.loads(Path(path).read_text())


def check_download(out: dict, frames: dict, record: dict) -> None:
    for s in SPLITS:
        table = pq.read_table(out[s])
        assert table.column_names == list(frames[s].columns), f"download {s}: columns"
        rows = table.to_pylist()
        odd = {
            type(v).__name__ for row in rows for v in row.values() if v is not None and not isinstance(v, str)
        }
        assert not odd, f"download {s}: cells of types {odd} (every cell is str or None)"
        assert_same_rows(rows, frame_cells(frames[s]), f"download {s}.parquet")
    assert json_file(out["sources"]) == record


PRE_COLUMNS = {
    "train": ["messages", "meta"],
    "validation": ["messages", "meta"],
    "test": ["messages", "query", "reference", "target", "meta"],
}


def check_preprocess(out: dict, rows: dict, report: dict) -> None:
    for s in SPLITS:
        file = pq.ParquetFile(out[s])
        codecs = {
            file.metadata.row_group(g).column(c).compression
            for g in range(file.metadata.num_row_groups)
            for c in range(file.metadata.num_columns)
        }
        assert codecs == {"ZSTD"}, f"preprocess {s}.parquet: compression {codecs}"
        table = file.read()
        assert table.column_names == PRE_COLUMNS[s], f"preprocess {s}: columns"
        assert pa.types.is_string(table.schema.field("meta").type) or pa.types.is_large_string(
            table.schema.field("meta").type
        ), f"preprocess {s}: meta is {table.schema.field('meta').type}, not a JSON string"
        new = [{**r, "meta": json.loads(r["meta"])} for r in table.to_pylist()]
        assert_same_rows(new, rows[s], f"preprocess {s}.parquet")
    assert json_file(out["report"]) == report


def check_format(out: dict, rows: dict, stats: dict) -> None:
    from workflow_scripts.data.tokens import open_tokens

    for s in SPLITS:
        table = pq.read_table(out[s])
        assert table.column_names == list(rows[s][0]), f"format {s}: columns"
        new = table.to_pylist()
        assert_same_rows(new, rows[s], f"format {s}.parquet")
        if s == "test":
            continue
        assert table.schema.field("input_ids").type == pa.list_(pa.int32()), f"format {s}: input_ids dtype"
        tokens = open_tokens(out[f"{s}_tokens"]).to_dict()
        assert tokens["input_ids"] == [r["input_ids"] for r in new], f"format {s}.tokens.arrow: input_ids"
        assert tokens["prompt_length"] == [r["prompt_length"] for r in new], (
            f"{s}.tokens.arrow: prompt_length"
        )
        assert tokens["length"] == [len(r["input_ids"]) for r in new], f"format {s}.tokens.arrow: length"
    assert json_file(out["stats"]) == stats


def check_all_stages(
    tmp_path, model_dir, dataset: dict, mf: dict, filters: dict, formats: list, threads=(1, 2)
) -> dict:
    """Run legacy and new stages on one dataset; ``formats`` holds format params, or
    ``(None, overlength)`` for max_length = the median train length (some rows over it); format runs
    with each of ``threads`` (2: the worker processes)."""
    frames, record = legacy_download(dataset)
    old_rows, old_report = legacy_preprocess(frames, mf, filters)

    raw = run_download(dataset, tmp_path)
    check_download(raw, frames, record)
    pre = run_preprocess(raw, tmp_path, mf, filters)
    check_preprocess(pre, old_rows, old_report)

    for i, fmt in enumerate(formats):
        probed = isinstance(fmt, tuple)
        if probed:
            _, probe = legacy_format(old_rows, model_dir, {"max_length": 10**6, "overlength": "drop"})
            fmt = {"max_length": probe["train"]["tokens"]["p50"], "overlength": fmt[1]}
        old_fmt, old_stats = legacy_format(old_rows, model_dir, fmt)
        if probed:  # the overlength path is exercised
            assert old_stats["train"]["over_max_length"] > 0, old_stats
        for n in threads:
            out = run_format(pre, model_dir, tmp_path / f"fmt{i}-threads{n}", fmt, n)
            check_format(out, old_fmt, old_stats)
    return old_report


# --- datasets -------------------------------------------------------------------------------


class Raw(str):
    """A value written into a JSON line as is (a number exactly as typed: 1.50, 1e3)."""


def json_object(row: dict, ascii_only: bool = True) -> str:
    return (
        "{"
        + ", ".join(
            f"{json.dumps(k)}: {v if isinstance(v, Raw) else json.dumps(v, ensure_ascii=ascii_only)}"
            for k, v in row.items()
        )
        + "}"
    )


def own_rows(n: int, start: int = 0) -> list[dict]:
    """Sample rows under a user's own column names."""
    return [
        {"Q": r[Q], "Why": r["Complex_CoT"], "A": r["Response"], "kind": r["question_type"]}
        for r in sample_rows(start + n)[start:]
    ]


def messy(rows: list[dict], train_prompts: list[str] = ()) -> list[dict]:
    """Rows a real export has, spread over the file: numbers as typed, empty and missing cells,
    odd keys and order, duplicate prompts, text the filters drop; ``train_prompts`` are repeated
    (duplicate_of_train)."""
    rows = [dict(r) for r in rows]
    at = [(k * 13) % len(rows) for k in range(1, 18)]  # distinct for the sizes used here
    rows[at[0]]["A"] = Raw("1.50")
    rows[at[1]]["A"] = Raw("1e3")
    rows[at[2]]["A"] = Raw("12345678901234567890")
    rows[at[3]]["A"] = ""  # empty:a
    rows[at[4]]["Why"] = None  # empty:why
    del rows[at[5]]["kind"]  # a missing metadata cell
    r = rows[at[6]]
    rows[at[6]] = {"kind": r["kind"], "A": r["A"], "Q": r["Q"], "Why": r["Why"]}  # another key order
    rows[at[7]]["Q"] = "Too short?"  # too_short:q
    rows[at[8]]["A"] = "no digits in this answer"  # answer_regex
    rows[at[9]]["Q"] = "  " + rows[at[10]]["Q"].upper() + "\n"  # duplicate_prompt once normalised
    rows[at[11]]["A"] = "x" * 900 + " 1"  # too_long:a
    rows[at[12]]["Why"] = "Café, naïve, 中文, emoji \U0001f600, a tab\tand more"
    rows[at[12]]["kind"] = "ünïcode"
    rows[at[13]]["tags"] = Raw('[1, 2.50, {"x": null, "y": true}]')  # a column first seen mid-file
    rows[at[13]]["flag"] = Raw("true")
    rows[-1]["note"] = Raw("-0.0")  # a column first seen in the last row
    for k, prompt in enumerate(train_prompts):
        rows[at[14 + k]]["Q"] = prompt
    return rows


OWN_FORMAT = {
    "training_columns": {"q": "Q", "why": "Why", "a": "A"},
    "messages_format": {
        "system_prompt": "Answer briefly.",
        "messages": [
            {"role": "system", "content": "{system_prompt}"},
            {"role": "user", "content": "{q}"},
            {"role": "assistant", "content": "{why}\nSo: {a}"},
        ],
    },
    "evaluate_columns": {"query": "Q", "response": "A"},
    "metadata_columns": ["kind"],
}
OWN_FILTERS = {
    "drop_empty": True,
    "min_chars": {"q": 15},
    "max_chars": {"a": 800},
    "answer_regex": r"\d",
    "deduplicate_prompts": True,
}


def write_lines(path: Path, rows: list[dict], newline="\n", bom=False, blank_every=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        if blank_every and i % blank_every == blank_every - 1:
            lines.append("   ")
        lines.append(json_object(row, ascii_only=False))
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join(lines + [""]).encode())
    return path


def dataset_cfg(path, **kw) -> dict:
    cfg = {"id": str(path), "config": None, "revision": None, "max_rows": None, "data_files": None}
    cfg.update(split_names=None, split={"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 3})
    cfg.update(kw)
    return cfg


def case_split_folder(tmp_path):
    """train/dev/test files of a folder, own columns, CRLF lines, a BOM, blank lines."""
    train = messy(own_rows(60))
    write_lines(tmp_path / "mine" / "train.jsonl", train, newline="\r\n", bom=True, blank_every=9)
    write_lines(tmp_path / "mine" / "dev.jsonl", messy(own_rows(24, 60), [train[20]["Q"]]))
    write_lines(tmp_path / "mine" / "test.jsonl", messy(own_rows(30, 84), [train[20]["Q"], train[33]["Q"]]))
    return dataset_cfg(tmp_path / "mine"), [(None, "drop"), (None, "truncate")]


def case_csv(tmp_path):
    """One CSV file: validation/test carved with a seed, a max_rows cap; quoted commas and line
    breaks, empty cells (missing), NA and 007 and 1.50 kept as written."""
    rows = messy(own_rows(80))
    frame = pd.DataFrame([{k: (None if v is None else str(v)) for k, v in r.items()} for r in rows])
    frame.loc[20, "A"] = "007"
    frame.loc[21, "A"] = "NA 5"
    frame.loc[22, "Q"] = frame.loc[22, "Q"] + ', with "quotes", commas\nand a line break'
    (tmp_path / "csv").mkdir(parents=True)
    frame.to_csv(tmp_path / "csv" / "all.csv", index=False)
    return dataset_cfg(tmp_path / "csv" / "all.csv", max_rows=40), [(None, "truncate")]


def case_parquet(tmp_path):
    """Parquet shards named by data_files (a glob), small row groups, typed columns (floats,
    nullable ints, booleans, lists, structs), a column only one shard has; validation carved."""
    rows = own_rows(90)
    folder = tmp_path / "pq"
    (folder / "shards").mkdir(parents=True)

    def shard(part, extra=False):
        n = len(part)
        cols = {k: [r[k] for r in part] for k in ("Q", "Why", "A", "kind")}
        cols["A"][0] = None
        cols["score"] = [1.5 + i / 4 for i in range(n)]
        cols["count"] = pd.array([None if i % 5 == 0 else 900 + i for i in range(n)], dtype="Int64")
        cols["flag"] = [i % 3 == 0 for i in range(n)]
        cols["ids"] = [[i, i + 1] for i in range(n)]
        cols["info"] = [{"a": i, "b": None if i % 2 else "x"} for i in range(n)]
        if extra:
            cols["note"] = [f"n{i}" if i % 4 else None for i in range(n)]
        return pa.Table.from_pandas(pd.DataFrame(cols), preserve_index=False)

    pq.write_table(shard(rows[:35], extra=True), folder / "shards" / "train-0.parquet", row_group_size=5)
    dup = [dict(r, Q=rows[1]["Q"]) if i == 3 else r for i, r in enumerate(rows[35:65])]
    pq.write_table(shard(dup), folder / "shards" / "train-1.parquet", row_group_size=4)
    test = [dict(r, Q=rows[40]["Q"]) if i == 2 else r for i, r in enumerate(rows[65:])]
    pq.write_table(shard(test), folder / "holdout.parquet", row_group_size=6)
    data_files = {"train": "shards/train-*.parquet", "test": "holdout.parquet"}
    return dataset_cfg(folder, data_files=data_files), [{"max_length": 10**6, "overlength": "drop"}]


def case_json_array(tmp_path):
    """A `.json` file holding one JSON array over many lines; the whole pool, carved."""
    rows = messy(own_rows(70))
    text = "[\n" + ",\n".join("  " + json_object(r, ascii_only=False) for r in rows) + "\n]\n"
    (tmp_path / "arr").mkdir(parents=True)
    (tmp_path / "arr" / "data.json").write_text(text)
    return dataset_cfg(tmp_path / "arr" / "data.json"), [(None, "drop")]


def case_symlinked(tmp_path):
    """dataset.id is a link to a folder, whose test file is a link to a JSON-lines `.json`
    elsewhere (the record names what each link resolved to)."""
    train = messy(own_rows(50))
    write_lines(tmp_path / "real" / "mydata_train.jsonl", train)
    write_lines(tmp_path / "elsewhere" / "holdout.json", messy(own_rows(25, 50), [train[30]["Q"]]))
    os.symlink(tmp_path / "elsewhere" / "holdout.json", tmp_path / "real" / "mydata_test.json")
    os.symlink(tmp_path / "real", tmp_path / "linked")
    return dataset_cfg(tmp_path / "linked"), [(None, "truncate")]


ALL_REASONS = {
    "empty:a",
    "empty:why",
    "too_short:q",
    "too_long:a",
    "answer_regex",
    "duplicate_prompt",
    "duplicate_of_train",
}
# case: (builder, the drop reasons the legacy report has, so each case exercises them)
CASES = {
    "split_folder": (case_split_folder, ALL_REASONS),
    "csv": (case_csv, ALL_REASONS - {"duplicate_prompt", "duplicate_of_train"}),
    "parquet": (case_parquet, {"empty:a", "duplicate_prompt", "duplicate_of_train"}),
    "json_array": (case_json_array, ALL_REASONS - {"duplicate_prompt", "duplicate_of_train"}),
    "symlinked": (case_symlinked, ALL_REASONS),
}


@pytest.mark.parametrize("case", list(CASES))
def test_users_layouts_stream_to_the_same_outputs(
    case, tmp_path, monkeypatch, tiny_model_dir, resolved_config
):
    small_batches(monkeypatch, 7)
    build, reasons = CASES[case]
    dataset, formats = build(tmp_path / "data")
    cfg = resolved_config({"messages_format": OWN_FORMAT, "filters": OWN_FILTERS})
    # the worker processes on the richest layout (and the sample, below); the others read differently
    # but format alike, so one process is enough there
    threads = (1, 2) if case == "split_folder" else (1,)
    report = check_all_stages(
        tmp_path / "out", tiny_model_dir, dataset, cfg["messages_format"], cfg["filters"], formats, threads
    )
    assert {r for s in SPLITS for r in report[s]["dropped"]} == reasons


@pytest.mark.e2e  # the slowest case: 3000 rows through all three stages
def test_the_shipped_sample_streams_to_the_same_outputs(
    tmp_path, monkeypatch, tiny_model_dir, resolved_config
):
    small_batches(monkeypatch, 23)  # ~120 train batches, 2 of validation
    cfg = resolved_config()
    dataset = {**cfg["dataset"], "id": str(REPO / cfg["dataset"]["id"])}
    report = check_all_stages(  # worker processes only: one process is checked on every layout above
        tmp_path,
        tiny_model_dir,
        dataset,
        cfg["messages_format"],
        cfg["filters"],
        [format_settings(cfg)],
        (2,),
    )
    assert sum(report[s]["rows_in"] for s in SPLITS) == 3000


# --- a broken row deep in a file ------------------------------------------------------------


def _with_bad_line_95(path: Path) -> Path:
    rows = own_rows(100)
    lines = [json_object(r) for r in rows]
    lines[9] = lines[49] = ""  # blank lines count: the bad one is still physical line 95
    lines[94] = lines[94][:-1]  # unterminated object
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("layout", ["single_file", "test_file_of_a_folder"])
def test_a_bad_line_deep_in_a_file_names_it_and_writes_nothing(layout, tmp_path, monkeypatch):
    small_batches(monkeypatch, 7)
    if layout == "single_file":
        bad = _with_bad_line_95(tmp_path / "data" / "pool.jsonl")
        dataset = dataset_cfg(bad)
    else:  # train and validation would be complete before test is read
        write_lines(tmp_path / "data" / "train.jsonl", own_rows(60))
        write_lines(tmp_path / "data" / "validation.jsonl", own_rows(20, 60))
        bad = _with_bad_line_95(tmp_path / "data" / "test.jsonl")
        dataset = dataset_cfg(tmp_path / "data")
    with pytest.raises((StageError, SourceError)) as err:
        run_download(dataset, tmp_path / "out")
    assert str(bad) in str(err.value) and re.search(r"\bline 95\b", str(err.value)), str(err.value)
    raw = tmp_path / "out" / "raw"
    left = sorted(p.name for p in raw.iterdir()) if raw.exists() else []
    assert not left, f"download left {left} behind"
