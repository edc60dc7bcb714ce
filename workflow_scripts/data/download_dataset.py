"""Stage 1: fetch the dataset (Hub id or local files) and write train/validation/test parquet.

Set-up: find the files or Hub splits that feed each split (sources.py; an unrecognised file
name is an error). Work: read every cell as text exactly as written, batch by batch, into a
scratch Arrow file per split (on disk, never a whole split in memory); keep the splits the source
has, carve only the missing ones from the shuffled train rows. Save: one zstd parquet per split,
written a batch at a time, and `sources.json`, the record of which files fed each split and what
was carved with which seed.
"""

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workflow_scripts.credentials import hf_token
from workflow_scripts.data import sources
from workflow_scripts.data.sources import (
    SPLIT_KEYWORDS,
    SPLITS,
    SourceError,
    carve_counts,
    is_local_dataset,
    local_split_files,
    row_batches,
    rows_as_text,
)
from workflow_scripts.data.streams import ParquetSink, Progress
from workflow_scripts.files import remove_stale_temps, write_json
from workflow_scripts.stage import Job, StageError, snakemake_main

log = logging.getLogger("snaketune.download_dataset")

# Buckets of the external shuffle that carves splits out of train: one bucket, BUCKET_BATCHES x
# BATCH_ROWS rows (~7 MB of text at the default, ~4x that while it is put in order), is in memory at
# a time, whatever the size of the data. Measured at 1M rows: 4 keeps the stage's peak at its 100k
# peak (16 added 100 MB, 64 added 330 MB) for ~8% more time than 16.
BUCKET_BATCHES = 4

# Hub split names understood without `dataset.split_names`: the datasets library's vocabulary,
# the same table that names local split files.
HUB_ALIASES = {word: split for split, words in SPLIT_KEYWORDS.items() for word in words}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Spill:
    """A split's rows as they are read, on disk: Arrow IPC files in a scratch folder (a new file
    when a batch brings a column not seen before), every cell text or null. Columns keep the
    order they were first seen in, as a table built from all the rows at once would have."""

    def __init__(self, folder: Path, split: str):
        self.folder, self.split = folder, split
        self.columns: list[str] = []
        self.files: list[Path] = []
        self.rows = 0
        self._writer = self._sink = None

    def add(self, rows: list[dict]) -> None:
        known = set(self.columns)
        new = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in known]
        if new or self._writer is None:
            self._close_file()
            self.columns += new
            path = self.folder / f"{self.split}-{len(self.files)}.arrow"
            self._sink = pa.OSFile(str(path), "wb")
            schema = pa.schema([(c, pa.string()) for c in self.columns])
            self._writer = pa.ipc.new_file(self._sink, schema)
            self.files.append(path)
        arrays = [pa.array([r.get(c) for r in rows], type=pa.string()) for c in self.columns]
        self._writer.write_batch(pa.record_batch(arrays, names=self.columns))
        self.rows += len(rows)

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def batches(self):
        """The rows in the order they were read, a record batch at a time, every column present
        (null where a batch predates it). Read from the file (no memory map), so only the current
        batch is in memory."""
        self._close_file()
        schema = pa.schema([(c, pa.string()) for c in self.columns])
        for f in self.files:
            with pa.OSFile(str(f)) as source:
                reader = pa.ipc.open_file(source)
                for i in range(reader.num_record_batches):
                    yield _full(reader.get_batch(i), schema)


def _full(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with every column of ``schema``, in its order (null where the batch lacks one)."""
    columns = [
        batch.column(name) if name in batch.schema.names else pa.nulls(batch.num_rows, pa.string())
        for name in schema.names
    ]
    return pa.record_batch(columns, schema=schema)


def in_order(spill: Spill, indices: np.ndarray, scratch: Path):
    """The rows of ``spill`` at ``indices`` (each at most once), in that order, as tables of at
    most BATCH_ROWS rows, with bounded memory at any size: an external shuffle. One sequential
    pass sends each row to the bucket file of its output position (BUCKET_BATCHES x BATCH_ROWS
    positions a bucket); then each bucket, read whole, is put in order."""
    step = sources.BATCH_ROWS
    if np.array_equal(indices, np.arange(len(indices))):  # a prefix in file order: no shuffle
        yield from _prefix(spill, len(indices))
        return
    bucket_rows = step * BUCKET_BATCHES
    position = np.full(spill.rows, -1, dtype=np.int64)  # output position of each row (-1: not taken)
    position[indices] = np.arange(len(indices))
    n_buckets = -(-len(indices) // bucket_rows)
    schema = pa.schema([(c, pa.string()) for c in spill.columns] + [("__position", pa.int64())])
    paths = [scratch / f"{spill.split}-bucket-{b}.arrow" for b in range(n_buckets)]
    sinks = [pa.OSFile(str(p), "wb") for p in paths]
    writers = [pa.ipc.new_file(sink, schema) for sink in sinks]
    start = 0
    for batch in spill.batches():
        pos = position[start : start + batch.num_rows]
        start += batch.num_rows
        taken = np.nonzero(pos >= 0)[0]
        bucket = pos[taken] // bucket_rows
        for b in np.unique(bucket):
            rows = taken[bucket == b]
            part = batch.take(pa.array(rows)).append_column("__position", pa.array(pos[rows]))
            writers[b].write_batch(part)
    for writer, sink in zip(writers, sinks, strict=True):
        writer.close()
        sink.close()
    for path in paths:
        with pa.OSFile(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        path.unlink()
        table = table.take(pc.sort_indices(table.column("__position"))).drop_columns(["__position"])
        for offset in range(0, table.num_rows, step):
            yield table.slice(offset, step)


def _prefix(spill: Spill, n: int):
    for batch in spill.batches():
        if n <= 0:
            return
        yield pa.Table.from_batches([batch.slice(0, n)])
        n -= batch.num_rows


def _spill_rows(spill: Spill, batches, progress: Progress) -> int:
    rows = 0
    for batch in batches:
        spill.add(batch)
        rows += len(batch)
        progress.update(len(batch))
    return rows


def load_local(cfg: dict, scratch: Path, progress: Progress) -> tuple[dict[str, Spill], dict]:
    files_record: dict[str, list[dict]] = {}
    spills = {}
    try:
        by_split, how = local_split_files(cfg)
        for split, files in by_split.items():
            spills[split] = Spill(scratch, split)
            for f in files:
                rows = _spill_rows(spills[split], row_batches(f), progress)
                entry = {"path": f, "sha256": _sha256(f), "rows": rows}
                if os.path.realpath(f) != os.path.abspath(f):  # reached through a link
                    entry["resolved"] = os.path.realpath(f)
                files_record.setdefault(split, []).append(entry)
    except SourceError as exc:
        raise StageError(str(exc)) from None
    log.info(
        "local files per split (%s): %s", how, {s: [e["path"] for e in v] for s, v in files_record.items()}
    )
    return spills, {"source": "local", "found_by": how, "files": files_record}


def _hub_batches(split_ds):
    # Arrow batches as stored (as to_list gives them: features such as images are not decoded)
    for table in split_ds.with_format("arrow").iter(batch_size=sources.BATCH_ROWS):
        yield rows_as_text(table.to_pylist())


def load_hub(cfg: dict, scratch: Path, progress: Progress) -> tuple[dict[str, Spill], dict]:
    import datasets

    dataset_id = cfg["id"]
    log.info("loading Hub dataset %s (config=%s, revision=%s)", dataset_id, cfg["config"], cfg["revision"])
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
                log.info(
                    "ignoring split %r (not train/validation/test; map it with dataset.split_names)", theirs
                )
            elif ours in wanted:
                raise StageError(
                    f"dataset.id: {dataset_id} has splits {wanted[ours]!r} and {theirs!r} that both mean "
                    f"{ours}; choose one with dataset.split_names.{ours}"
                )
            else:
                wanted[ours] = theirs
    if "train" not in wanted:
        raise StageError(
            f"dataset.id: {dataset_id} has no train split (splits: {sorted(source)}); "
            "map one with dataset.split_names.train"
        )
    spills = {}
    for ours, theirs in wanted.items():
        spills[ours] = Spill(scratch, ours)
        _spill_rows(spills[ours], _hub_batches(source[theirs]), progress)
    record = {
        "source": "hub",
        "id": dataset_id,
        "config": cfg["config"],
        "revision": cfg["revision"],
        "splits": wanted,
    }
    return spills, record


def make_splits(spills: dict[str, Spill], cfg: dict) -> tuple[dict[str, tuple[Spill, np.ndarray]], dict]:
    """Which rows of which spill each split gets: the splits the source has as they are; the
    missing ones carved out of the shuffled train split."""
    ratios, seed = cfg["split"], cfg["split"]["seed"]
    # The same permutation as datasets' Dataset.shuffle(seed) (numpy's default generator).
    order = np.random.default_rng(seed).permutation(spills["train"].rows)
    named = {s: (sp, np.arange(sp.rows)) for s, sp in spills.items() if s != "train"}
    missing = [s for s in ("validation", "test") if s not in named]
    carved, start = {}, 0
    if missing:
        total = ratios["train"] + sum(ratios[s] for s in missing)
        counts = carve_counts(len(order), ratios, missing)
        for s in missing:
            k = counts[s]
            named[s] = (spills["train"], order[start : start + k])
            carved[s] = {"rows": k, "share_of_train_pool": round(ratios[s] / total, 6)}
            start += k
        log.info("carved %s out of the train split (seed %d): %s", missing, seed, carved)
    named["train"] = (spills["train"], order[start:])
    if cfg["max_rows"]:
        named = {s: (sp, rows[: cfg["max_rows"]]) for s, (sp, rows) in named.items()}
    for s in SPLITS:
        if len(named[s][1]) == 0:
            raise StageError(
                f"dataset.split.{s}: the {s} split is empty (ratios {dict(ratios)}, "
                f"train rows {len(order) - start})"
            )
    return named, {"carved_from_train": carved, "seed": seed, "max_rows": cfg["max_rows"]}


def write_splits(plan: dict[str, tuple[Spill, np.ndarray]], job: Job, scratch: Path, progress: Progress):
    """Every split's parquet, all kept or none. Splits cut from one spill (carved from train) are
    written in one shuffle of that spill, in the order of their rows in the permutation."""
    by_spill: dict[int, list[str]] = {}
    for s, (spill, _) in plan.items():
        by_spill.setdefault(id(spill), []).append(s)
    with contextlib.ExitStack() as outputs:
        sinks = {s: outputs.enter_context(ParquetSink(job.output[s])) for s in SPLITS}
        for names in by_spill.values():
            spill = plan[names[0]][0]
            sizes = [len(plan[s][1]) for s in names]
            wanted = np.concatenate([plan[s][1] for s in names])
            bounds = np.cumsum([0, *sizes])
            done = 0
            for table in in_order(spill, wanted, scratch):
                for s, lo, hi in zip(names, bounds[:-1], bounds[1:], strict=True):
                    a, b = max(lo, done), min(hi, done + table.num_rows)
                    if a < b:
                        sinks[s].write(table.slice(a - done, b - a))
                done += table.num_rows
                progress.update(table.num_rows)


def run(job: Job) -> dict[str, int]:
    """Outputs: a parquet file per split and ``sources`` (the provenance record)."""
    cfg = job.params.dataset
    out_dir = Path(job.output.sources).parent
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    # Scratch beside the outputs, named like an atomic temp of sources.json (written last), so a
    # killed run's scratch is removed by the next run (files.atomic_path).
    remove_stale_temps(Path(job.output.sources))  # a killed run's scratch, before making another
    scratch = Path(tempfile.mkdtemp(prefix=f".{Path(job.output.sources).name}.tmp-", dir=out_dir))
    try:
        reading = Progress("download_dataset: read")
        load = load_local if is_local_dataset(cfg["id"]) else load_hub
        spills, record = load(cfg, scratch, reading)
        reading.done()
        splits, carving = make_splits(spills, cfg)
        counts = {s: len(splits[s][1]) for s in SPLITS}
        writing = Progress("download_dataset: write")
        write_splits(splits, job, scratch, writing)
        writing.done()
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        for folder in created:  # leave no trace of a failed first run
            with contextlib.suppress(OSError):  # (a folder something else landed in stays)
                folder.rmdir()
        raise
    shutil.rmtree(scratch, ignore_errors=True)
    write_json(job.output.sources, {**record, **carving, "rows": counts})
    log.info("rows per split: %s", counts)
    return counts


if "snakemake" in globals():
    snakemake_main(snakemake, run)
