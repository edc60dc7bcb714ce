"""Stage 1: fetch the dataset (Hub id or local files) and write train/validation/test parquet.

Set-up: find the files or Hub splits that feed each split (sources.py; an unrecognised file
name is an error). Work: read every cell as text exactly as written, batch by batch, into a
scratch Arrow file per split (on disk, never a whole split in memory); keep the splits the source
has, carve only the missing ones from the shuffled train rows. Save: one zstd parquet per split,
written a batch at a time, and `sources.json`, the record of which files fed each split and what
was carved with which seed.
"""

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from workflow_scripts.credentials import hf_token
from workflow_scripts.data import sources
from workflow_scripts.data.sources import (
    SPLIT_KEYWORDS,
    SPLITS,
    SourceError,
    carve_counts,
    local_split_files,
    looks_local,
    row_batches,
    rows_as_text,
)
from workflow_scripts.data.streams import ParquetSink, Progress
from workflow_scripts.files import write_json
from workflow_scripts.stage import Job, StageError, snakemake_main

log = logging.getLogger("snaketune.download_dataset")

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

    def take(self, indices: np.ndarray) -> pa.Table:
        """Rows at ``indices``, in that order. The files are mapped only for this call, so the
        pages a call touches leave this process's memory with it (bounded at any size); each
        record batch is indexed on its own (a take across the whole chunked table would join it)."""
        self._close_file()
        batches = []
        for f in self.files:
            reader = pa.ipc.open_file(pa.memory_map(str(f)))
            batches += [reader.get_batch(i) for i in range(reader.num_record_batches)]
        bounds = np.cumsum([0] + [b.num_rows for b in batches])
        which = np.searchsorted(bounds, indices, side="right") - 1
        grouped = np.argsort(which, kind="stable")
        parts = [
            pa.Table.from_batches([batches[b].take(pa.array(indices[which == b] - bounds[b]))])
            for b in np.unique(which)
        ]
        table = pa.concat_tables(parts, promote_options="default")
        for column in self.columns:  # a column first seen in a later batch: null in these rows
            if column not in table.column_names:
                table = table.append_column(column, pa.nulls(table.num_rows, pa.string()))
        table = table.select(self.columns).combine_chunks()
        back = np.empty_like(grouped)
        back[grouped] = np.arange(len(grouped))
        return table.take(pa.array(back))


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
    for columns in split_ds.iter(batch_size=sources.BATCH_ROWS):
        names = list(columns)
        yield rows_as_text(
            [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        )


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


def write_split(path: str, spill: Spill, rows: np.ndarray, progress: Progress) -> None:
    with ParquetSink(path) as sink:
        for start in range(0, len(rows), sources.BATCH_ROWS):
            sink.write(spill.take(rows[start : start + sources.BATCH_ROWS]))
            progress.update(min(sources.BATCH_ROWS, len(rows) - start))


def run(job: Job) -> dict[str, int]:
    """Outputs: a parquet file per split and ``sources`` (the provenance record)."""
    cfg = job.params.dataset
    out_dir = Path(job.output.sources).parent
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Scratch beside the outputs, named like an atomic temp of sources.json (written last), so a
    # killed run's scratch is removed by the next run (files.atomic_path).
    scratch = Path(tempfile.mkdtemp(prefix=f".{Path(job.output.sources).name}.tmp-", dir=out_dir))
    try:
        reading = Progress("download_dataset: read")
        load = load_local if looks_local(cfg["id"]) else load_hub
        spills, record = load(cfg, scratch, reading)
        reading.done()
        splits, carving = make_splits(spills, cfg)
        counts = {s: len(splits[s][1]) for s in SPLITS}
        writing = Progress("download_dataset: write")
        for s in SPLITS:
            write_split(job.output[s], *splits[s], writing)
        writing.done()
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        if created and not any(out_dir.iterdir()):  # leave no trace of a failed first run
            out_dir.rmdir()
        raise
    shutil.rmtree(scratch, ignore_errors=True)
    write_json(job.output.sources, {**record, **carving, "rows": counts})
    log.info("rows per split: %s", counts)
    return counts


if "snakemake" in globals():
    snakemake_main(snakemake, run)
