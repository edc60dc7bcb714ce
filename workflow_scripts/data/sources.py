"""Which local files feed which split, and reading them as text exactly as written.

Pure standard library (plus pandas for reading), so the Snakefile can list every data file as
an input of `download_dataset` and refuse an unrecognised file name at load time, before any
job runs.

Split names follow the `datasets` library's own vocabulary (``datasets.data_files.SPLIT_KEYWORDS``
and ``NON_WORDS_CHARS``; a test checks these copies still match): a file belongs to a split when
a keyword appears in its name (or a folder name on its path) between separators -- the start or
end of the name, ``-``, ``_``, ``.``, a space or a digit. `finqa_train.jsonl`, `test_2024.jsonl`,
`validation_set.jsonl`, `eval.jsonl` and `dev/part-0.jsonl` are all recognised. A file that
matches no split, or more than one, is an error: it is never silently training data.
"""

import functools
import json
import os
import re
from pathlib import Path

SPLITS = ("train", "validation", "test")
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Copied from datasets.data_files (datasets 5.x); tests/test_sources.py checks they still match.
SPLIT_KEYWORDS = {
    "train": ["train", "training"],
    "validation": ["validation", "valid", "dev", "val"],
    "test": ["test", "testing", "eval", "evaluation"],
}
NON_WORDS_CHARS = "-._ 0-9"
_KEYWORD_RE = {
    split: re.compile(
        rf"(?:^|[{NON_WORDS_CHARS}])(?:{'|'.join(words)})(?:[{NON_WORDS_CHARS}]|$)", re.IGNORECASE
    )
    for split, words in SPLIT_KEYWORDS.items()
}
DATA_FILES_HINT = (
    "name the files of each split explicitly, e.g.\n"
    "  dataset:\n"
    "    data_files: {train: 'part1_*.jsonl', validation: dev_set.jsonl, test: holdout.jsonl}"
    "  # paths or globs, relative to the dataset.id folder"
)


# Directory entries a folder scan or a glob may visit: a dataset folder holds far fewer, a
# pattern such as `/**/*.jsonl` (the whole filesystem) far more. Past it the load stops and says so.
MAX_SCAN_ENTRIES = 50_000
GLOB_CHARS = "*?["


class SourceError(ValueError):
    """Bad dataset input; the message names the key or file at fault."""


def is_local_dataset(dataset_id: str) -> bool:
    """`dataset.id` names local files (a path that exists, a data file's suffix, or a path's start)
    rather than a Hub dataset."""
    p = Path(dataset_id).expanduser()
    return p.exists() or p.suffix.lower() in FORMATS or dataset_id.startswith((".", "/", "~"))


def split_of(relative: str) -> str | None:
    """The split a file's path (relative to the dataset folder) names; None if none.

    Raises SourceError if it names several (``train_test.jsonl``).
    """
    parts = Path(relative).parts
    found = {s for s, rx in _KEYWORD_RE.items() for part in parts if rx.search(part)}
    if len(found) > 1:
        raise SourceError(
            f"dataset file {relative!r} names several splits ({', '.join(sorted(found))}); " + DATA_FILES_HINT
        )
    return found.pop() if found else None


def _scan(top: Path, key: str, what: str) -> list[str]:
    """Every file under ``top`` as a path relative to it, hidden files and folders left out.

    Symlinked folders and files are followed (a `test -> /data/holdout` link is data like any
    other; a link that loops is followed once). At most MAX_SCAN_ENTRIES entries are visited, so
    no pattern or folder can walk the whole filesystem. Callers refuse broken links they would use.
    """
    found, visited = [], 0
    for folder, dirs, files in os.walk(top, followlinks=True, onerror=None):
        real = os.path.realpath(folder)
        ancestors = {os.path.realpath(p) for p in Path(folder).parents if top in (p, *p.parents)}
        if real in ancestors:  # a link back up the tree: followed once
            dirs[:] = []
            continue
        visited += len(dirs) + len(files)
        if visited > MAX_SCAN_ENTRIES:
            raise SourceError(
                f"{key}: {what} visits more than {MAX_SCAN_ENTRIES} entries under {top}; point it at "
                "the folder that holds the data"
            )
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(folder).relative_to(top)
        for name in sorted(files):
            if not name.startswith("."):
                found.append(str(rel / name))
    return found


def _existing(path: Path, key: str) -> Path:
    if not path.exists():  # never skipped: it would silently change what a split holds
        raise SourceError(f"{key}: {path} is a broken link (its target {os.readlink(path)} is missing)")
    return path


def _data_files_in(folder: Path) -> list[Path]:
    files = _scan(folder, "dataset.id", f"scanning folder {folder}")
    out = []
    for rel in files:
        suffix = Path(rel).suffix.lower()
        if os.path.islink(folder / rel):  # a broken link is never skipped, whatever its name
            _existing(folder / rel, "dataset.id")
        if suffix in FORMATS:
            out.append(_existing(folder / rel, "dataset.id"))
        elif split_of(rel) is not None:  # named like a split but unreadable: never skipped silently
            raise SourceError(
                f"dataset.id: {folder / rel} names a split but is not a json, jsonl, csv or parquet file; "
                "convert it, or move it out of the folder"
            )
    return out


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob as a regex on `/`-separated relative paths: `*`, `?` and `[...]` stay inside one
    component, `**` matches any number of components (the `glob` module's rules)."""
    out = []
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        j, rx = 0, ""
        while j < len(part):
            c = part[j]
            if c == "*":
                rx += "[^/]*"
            elif c == "?":
                rx += "[^/]"
            elif c == "[" and "]" in part[j + 2 :]:
                end = part.index("]", j + 2)
                body = part[j + 1 : end]
                rx += "[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]"
                j = end
            else:
                rx += re.escape(c)
            j += 1
        out.append(rx + ("" if last else "/"))
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _expand(pattern: str, base: Path, key: str) -> list[Path]:
    """The files a path or glob names, as normalised paths (`a/../b` -> `b`), sorted.

    A plain path may point anywhere; a glob is matched by walking from its literal part (the
    folders before the first wildcard), with the walk bounded (_scan).
    """
    path = Path(pattern).expanduser()
    full = Path(os.path.normpath(path if path.is_absolute() else base / path))
    if not any(c in str(full) for c in GLOB_CHARS):
        if not full.exists():
            raise SourceError(f"{key}: {pattern!r} matches no file ({full} does not exist)")
        if not full.is_file():
            raise SourceError(f"{key}: {full} is not a file (name the files in it, e.g. '{pattern}/*.jsonl')")
        matches = [full]
    else:
        parts = full.parts
        first = next(i for i, p in enumerate(parts) if any(c in p for c in GLOB_CHARS))
        top = Path(*parts[:first]) if first else Path(".")
        rx = _glob_regex("/".join(parts[first:]))
        scanned = _scan(top, key, f"the pattern {pattern!r}") if top.is_dir() else []
        matches = [_existing(top / rel, key) for rel in scanned if rx.match(rel)]
        if not matches:
            raise SourceError(f"{key}: {pattern!r} matches no file (looked in {top})")
    for m in matches:
        if m.suffix.lower() not in FORMATS:
            raise SourceError(f"{key}: {m} is not a json, jsonl, csv or parquet file")
    return matches


def local_split_files(cfg: dict) -> tuple[dict[str, list[str]], str]:
    """Files per split of a local dataset, and how they were found ("file", "folder", "data_files").

    A single file is the whole pool (validation/test are carved from it). Raises SourceError.
    """
    root = Path(cfg["id"]).expanduser()
    data_files = cfg.get("data_files")
    if data_files:
        base = root if root.is_dir() else Path(".")
        out: dict[str, list[str]] = {}
        for split, spec in data_files.items():
            patterns = [spec] if isinstance(spec, str) else list(spec)
            files = [f for p in patterns for f in _expand(p, base, f"dataset.data_files.{split}")]
            out[split] = [str(f) for f in dict.fromkeys(files)]
        _check_disjoint(out, "dataset.data_files")
        how = "data_files"
    elif root.is_file():
        if root.suffix.lower() not in FORMATS:
            raise SourceError(
                f"dataset.id: unsupported file format {root.suffix!r} of {root} (use json, jsonl, csv or parquet)"
            )
        out, how = {"train": [str(root)]}, "file"
    elif root.is_dir():
        files = _data_files_in(root)
        if not files:
            raise SourceError(f"dataset.id: folder {root} holds no json, jsonl, csv or parquet file")
        out, unmatched = {}, []
        for f in files:
            split = split_of(str(f.relative_to(root)))
            if split is None:
                unmatched.append(str(f.relative_to(root)))
            else:
                out.setdefault(split, []).append(str(f))
        if unmatched:
            raise SourceError(
                f"dataset.id: in folder {root}, these files name no split (train/training, "
                f"validation/valid/val/dev, test/testing/eval/evaluation): {', '.join(unmatched)}; "
                + DATA_FILES_HINT
            )
        _check_disjoint(out, "dataset.id")
        how = "folder"
    else:
        raise SourceError(f"dataset.id: local path {root} does not exist")
    if "train" not in out:
        raise SourceError(
            f"dataset.id: {root} has no train files (found splits: {', '.join(sorted(out)) or 'none'}); "
            + DATA_FILES_HINT
        )
    formats = {FORMATS[Path(f).suffix.lower()] for files in out.values() for f in files}
    if len(formats) > 1:
        raise SourceError(f"dataset.id: {root} mixes formats {sorted(formats)}; keep one")
    return out, how


def _check_disjoint(by_split: dict[str, list[str]], key: str) -> None:
    """No file feeds two splits, or one split twice, however it is reached (another spelling, a
    link to it)."""
    seen: dict[str, tuple[str, str]] = {}
    for split, files in by_split.items():
        for f in files:
            real = os.path.realpath(f)
            if real in seen:
                other, first = seen[real]
                same = f if first == f else f"{f} (the same file as {first})"
                where = f"both {other} and {split}" if other != split else f"{split} twice"
                raise SourceError(f"{key}: {same} is read for {where}; a file feeds one split, once")
            seen[real] = (split, f)


def check_hub_data_files(cfg: dict) -> None:
    """A Hub dataset's data_files are paths inside its repository: relative, never leaving it."""
    for split, spec in (cfg.get("data_files") or {}).items():
        for pattern in [spec] if isinstance(spec, str) else spec:
            norm = os.path.normpath(pattern)
            if pattern.startswith(("/", "~")) or norm == ".." or norm.startswith("../"):
                raise SourceError(
                    f"dataset.data_files.{split}: {pattern!r} is outside the Hub repository of dataset.id "
                    "(files of a Hub dataset are relative paths inside it)"
                )


def carve_counts(rows: int, ratios: dict, missing: list[str]) -> dict[str, int]:
    """Rows per split when ``missing`` splits are carved out of ``rows`` train rows (train gets
    the rest); the one rule download_dataset cuts by and the load-time check predicts with."""
    total = ratios["train"] + sum(ratios[s] for s in missing)
    counts = {s: round(rows * ratios[s] / total) for s in missing}
    return {"train": rows - sum(counts.values()), **counts}


# Files larger than this are not counted at load (download_dataset checks the carved splits).
COUNT_MAX_BYTES = 256 * 2**20


def count_rows(files: list[str]) -> int | None:
    """Rows of local data files where that is cheap (JSON lines: non-empty lines; parquet: its
    metadata), None otherwise (csv, JSON arrays, large files). Each file is counted once per
    process while it is unchanged (a sweep checks every point)."""
    total = 0
    for f in files:
        st = os.stat(f)
        n = _count_file(os.path.realpath(f), st.st_size, st.st_mtime_ns)
        if n is None:
            return None
        total += n
    return total


@functools.lru_cache(maxsize=256)
def _count_file(path: str, size: int, mtime_ns: int) -> int | None:
    kind = Path(path).suffix.lower()
    if kind == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception:  # unreadable: download_dataset names the problem
            return None
    if kind in (".jsonl", ".json") and size <= COUNT_MAX_BYTES:
        try:
            with open(path, "rb") as fh:
                if fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"[":
                    return None  # a JSON array: counted when read
                fh.seek(0)
                return sum(1 for line in fh if line.strip())
        except OSError:  # unreadable: download_dataset names the problem
            return None
    return None


# --- reading: every cell as the text written in the file ---------------------------------


class _Written(str):
    """A JSON number kept as the text it was written as."""


def _json_text(value) -> str:
    """JSON of a container, with numbers exactly as written."""
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
    """A cell as text: scalars as written, containers as JSON, missing as None."""
    if value is None:
        return None
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (dict, list)):
        return _json_text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# Rows a data stage reads, transforms and writes at a time: large enough that per-batch overhead
# (an Arrow conversion, a tokenizer call) is noise, small enough that a batch of long chats stays
# in a few MB. Read at call time, so tests can shrink it to exercise many batches.
BATCH_ROWS = 4096


def _utf8_error(path: Path, line_no: int, line: bytes, exc: UnicodeDecodeError) -> SourceError:
    return SourceError(
        f"dataset file {path}: not UTF-8 (byte 0x{line[exc.start]:02x} on line {line_no}); "
        "re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`"
    )


def _first_bad_utf8(path: Path) -> SourceError:
    """The error naming the first line of ``path`` that is not UTF-8."""
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            data = line.removeprefix(b"\xef\xbb\xbf") if n == 1 else line
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                return _utf8_error(path, n, data, exc)
    return SourceError(f"dataset file {path}: not UTF-8; re-save it as UTF-8")


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as fh:
        return (
            path.suffix.lower() == ".json"
            and fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"["
        )


def _checked_row(row, path: Path, at: str) -> dict:
    if not isinstance(row, dict):
        raise SourceError(f"dataset file {path}: {at} is a {type(row).__name__}, not an object of columns")
    return {k: _as_text(v) for k, v in row.items()}


_KEEP_NUMBERS = {"parse_float": _Written, "parse_int": _Written}  # numbers exactly as written


def _json_batches(path: Path):
    """Rows of a JSON-lines file (or a JSON array), BATCH_ROWS at a time, cells as written; a
    broken line is one error naming the file and the line, wherever it is."""
    if _is_json_array(path):  # one JSON document: parsed whole (use JSON lines for large data)
        try:
            rows = json.loads(path.read_bytes().decode("utf-8-sig"), **_KEEP_NUMBERS)
        except UnicodeDecodeError:
            raise _first_bad_utf8(path) from None
        except json.JSONDecodeError as exc:
            raise SourceError(f"dataset file {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        for start in range(0, len(rows), BATCH_ROWS):
            yield [
                _checked_row(r, path, f"item {start + i}")
                for i, r in enumerate(rows[start : start + BATCH_ROWS])
            ]
        return
    batch = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            raw = raw.removeprefix(b"\xef\xbb\xbf") if n == 1 else raw
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _utf8_error(path, n, raw, exc) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line, **_KEEP_NUMBERS)
            except json.JSONDecodeError as exc:
                raise SourceError(f"dataset file {path}: line {n} is not valid JSON ({exc.msg})") from None
            batch.append(_checked_row(row, path, f"line {n}"))
            if len(batch) >= BATCH_ROWS:
                yield batch
                batch = []
    if batch:
        yield batch


def _csv_batches(path: Path):
    import pandas as pd

    try:
        # every cell as text; an empty cell is missing (None), "NA"/"null" stay as written
        chunks = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            encoding="utf-8-sig",
            chunksize=BATCH_ROWS,
        )
        for frame in chunks:
            yield [{k: (None if pd.isna(v) else v) for k, v in r.items()} for r in frame.to_dict("records")]
    except UnicodeDecodeError:
        raise _first_bad_utf8(path) from None
    except pd.errors.EmptyDataError:
        raise SourceError(f"dataset file {path}: the file is empty (no rows)") from None
    except pd.errors.ParserError as exc:
        raise SourceError(f"dataset file {path}: not a readable CSV ({exc})") from None


def _parquet_batches(path: Path):
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
        for batch in batches:
            yield [{k: _as_text(v) for k, v in row.items()} for row in batch.to_pylist()]
    except Exception as exc:
        raise SourceError(f"dataset file {path}: not a readable parquet file ({exc})") from None


READERS = {"json": _json_batches, "csv": _csv_batches, "parquet": _parquet_batches}


def row_batches(path: str | Path):
    """Rows of one local data file, BATCH_ROWS at a time, every value a string (as written) or
    None. A file with no rows is an error naming it."""
    path = Path(path)
    if path.stat().st_size == 0 or (path.suffix.lower() != ".parquet" and not _has_text(path)):
        raise SourceError(f"dataset file {path}: the file is empty (no rows)")
    rows = 0
    for batch in READERS[FORMATS[path.suffix.lower()]](path):
        rows += len(batch)
        yield batch
    if not rows:
        what = "a header but no rows" if FORMATS[path.suffix.lower()] == "csv" else "no rows"
        raise SourceError(f"dataset file {path}: {what}")


def _has_text(path: Path) -> bool:
    with open(path, "rb") as fh:
        while block := fh.read(1 << 16):
            if block.removeprefix(b"\xef\xbb\xbf").strip():
                return True
    return False


def read_rows(path: str | Path) -> list[dict]:
    """All rows of one small local data file, as a list; stages use row_batches."""
    return [row for batch in row_batches(path) for row in batch]


def rows_as_text(records: list[dict]) -> list[dict]:
    """Rows from another reader (a Hub dataset) with every value turned into text."""
    return [{k: _as_text(v) for k, v in row.items()} for row in records]
