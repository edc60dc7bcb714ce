"""Stage 1: fetch the dataset (Hub id or local files) and write train/validation/test parquet.

Set-up: find the files or Hub splits that feed each split (sources.py; an unrecognised file
name is an error). Work: read every cell as text exactly as written, keep the splits the source
has, carve only the missing ones from train. Save: one parquet per split and `sources.json`,
the record of which files fed each split and what was carved with which seed.
"""

import hashlib
import logging
import os

import numpy as np
import pandas as pd

from workflow_scripts.credentials import hf_token
from workflow_scripts.data.sources import (
    SPLIT_KEYWORDS,
    SPLITS,
    SourceError,
    carve_counts,
    local_split_files,
    looks_local,
    read_rows,
    rows_as_text,
)
from workflow_scripts.files import write_json, write_parquet
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
                if os.path.realpath(f) != os.path.abspath(f):  # reached through a link
                    entry["resolved"] = os.path.realpath(f)
                files_record.setdefault(split, []).append(entry)
            frames[split] = pd.DataFrame(rows, dtype=object)
    except SourceError as exc:
        raise StageError(str(exc)) from None
    log.info(
        "local files per split (%s): %s", how, {s: [e["path"] for e in v] for s, v in files_record.items()}
    )
    return frames, {"source": "local", "found_by": how, "files": files_record}


def load_hub(cfg: dict) -> tuple[dict[str, pd.DataFrame], dict]:
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
    # The same permutation as datasets' Dataset.shuffle(seed) (numpy's default generator).
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
        log.info("carved %s out of the train split (seed %d): %s", missing, seed, carved)
    named["train"] = train
    if cfg["max_rows"]:
        named = {s: f.iloc[: cfg["max_rows"]] for s, f in named.items()}
    for s in SPLITS:
        if len(named[s]) == 0:
            raise StageError(
                f"dataset.split.{s}: the {s} split is empty (ratios {dict(ratios)}, train rows {len(train)})"
            )
    return named, {"carved_from_train": carved, "seed": seed, "max_rows": cfg["max_rows"]}


def run(job: Job) -> dict[str, int]:
    """Outputs: a parquet file per split and ``sources`` (the provenance record)."""
    cfg = job.params.dataset
    frames, record = load_local(cfg) if looks_local(cfg["id"]) else load_hub(cfg)
    splits, carving = make_splits(frames, cfg)
    counts = {s: len(splits[s]) for s in SPLITS}
    for s in SPLITS:
        write_parquet(job.output[s], splits[s])
    write_json(job.output.sources, {**record, **carving, "rows": counts})
    log.info("rows per split: %s", counts)
    return counts


if "snakemake" in globals():
    snakemake_main(snakemake, run)
