"""Stage 1: fetch the dataset (Hub id or local file/folder) and write train/validation/test parquet."""

import logging
from pathlib import Path

from workflow_scripts.common import StageError, atomic_path, hf_token, snakemake_main

log = logging.getLogger("snaketune.download_dataset")

SPLITS = ("train", "validation", "test")
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}


def looks_local(dataset_id: str) -> bool:
    p = Path(dataset_id)
    return p.exists() or p.suffix.lower() in FORMATS or dataset_id.startswith((".", "/", "~"))


def _local_data_files(path: Path) -> tuple[str, dict[str, list[str]]]:
    """The `datasets` builder name and data files per split of a local file or folder."""
    if path.is_file():
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise StageError(
                f"dataset.id: unsupported file format {path.suffix!r} of {path} (use json, jsonl, csv or parquet)"
            )
        return fmt, {"train": [str(path)]}
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in FORMATS)
    if not files:
        raise StageError(f"dataset.id: folder {path} holds no json, jsonl, csv or parquet file")
    kinds = {FORMATS[f.suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise StageError(f"dataset.id: folder {path} mixes formats {sorted(kinds)}; keep one")
    by_split: dict[str, list[str]] = {}
    for f in files:
        stem = f.stem.lower().split("-")[0].split(".")[0]
        by_split.setdefault(SPLIT_ALIASES.get(stem, "train"), []).append(str(f))
    return kinds.pop(), by_split


def load_source(cfg: dict):
    """A DatasetDict with whatever splits the source has."""
    import datasets

    dataset_id = cfg["id"]
    if looks_local(dataset_id):
        path = Path(dataset_id).expanduser()
        if not path.exists():
            raise StageError(f"dataset.id: local path {path} does not exist")
        fmt, data_files = _local_data_files(path)
        log.info("loading local %s files: %s", fmt, data_files)
        try:
            return datasets.load_dataset(fmt, data_files=data_files)
        except Exception as exc:
            raise StageError(f"dataset.id: could not read {path} as {fmt}: {exc}") from exc
    log.info(
        "loading Hub dataset %s (config=%s, revision=%s)", dataset_id, cfg.get("config"), cfg.get("revision")
    )
    try:
        return datasets.load_dataset(
            dataset_id, name=cfg.get("config"), revision=cfg.get("revision"), token=hf_token()
        )
    except Exception as exc:
        raise StageError(
            f"dataset.id: could not load Hub dataset {dataset_id!r} ({type(exc).__name__}: {exc}). "
            "If the Hub is unreachable, download the data elsewhere and point dataset.id at a local "
            "json/jsonl/csv/parquet file or folder (e.g. --config dataset.id=data/my_data.jsonl)."
        ) from exc


def make_splits(source, cfg: dict) -> dict:
    """Keep the splits the source has; carve the missing ones with the configured ratios."""
    named = {}
    for name, ds in source.items():
        target = SPLIT_ALIASES.get(name.lower())
        if target is None:
            log.info("ignoring split %r (not train/validation/test)", name)
            continue
        named[target] = ds
    if "train" not in named:
        raise StageError(f"dataset.id: {cfg['id']} has no train split (splits: {sorted(source)})")
    ratios, seed = cfg["split"], cfg["split"]["seed"]
    train = named["train"].shuffle(seed=seed)
    missing = [s for s in ("validation", "test") if s not in named]
    if missing:
        share = {s: ratios[s] for s in missing}
        total = ratios["train"] + sum(share.values())
        n = len(train)
        start = 0
        for s in missing:
            k = round(n * share[s] / total)
            named[s] = train.select(range(start, start + k))
            start += k
        train = train.select(range(start, n))
        log.info("carved %s from train with ratios %s", missing, share)
    named["train"] = train
    if cfg.get("max_rows"):
        named = {s: ds.select(range(min(cfg["max_rows"], len(ds)))) for s, ds in named.items()}
    for s in SPLITS:
        if len(named[s]) == 0:
            raise StageError(
                f"dataset.split.{s}: the {s} split is empty (ratios {dict(ratios)}, rows {len(train)})"
            )
    return named


def run(cfg: dict, outputs: dict[str, str]) -> dict[str, int]:
    splits = make_splits(load_source(cfg), cfg)
    counts = {}
    for s in SPLITS:
        with atomic_path(outputs[s]) as tmp:
            splits[s].to_parquet(str(tmp))
        counts[s] = len(splits[s])
    log.info("rows per split: %s", counts)
    return counts


def _from_snakemake(smk) -> None:
    run(dict(smk.params.dataset), {s: smk.output[s] for s in SPLITS})


if "snakemake" in globals():
    snakemake_main(snakemake, _from_snakemake)
