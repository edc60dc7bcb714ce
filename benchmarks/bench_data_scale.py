"""The data stages at scale, side by side in one run: a plain `datasets` pipeline vs snaketune's.

For each size in `--rows`, a FinQA-style JSONL of that many rows (data/sample/make_sample.py,
made once and used by every side) goes through:

1. **datasets** (the pipeline a user would write): `load_dataset("json")`; batched maps with
   `num_proc=--procs` that build the messages of config.yaml's messages_format (system prompt,
   question, `<think>` chain of thought + response), render the model's chat template for the
   whole chat and for the prompt, tokenize both (`add_special_tokens=False`); `to_parquet`. All
   rows, no split, no filters. Its HF datasets cache is a temporary folder, deleted after.
2. **snaketune**: `snakemake --cores --procs <formatted>/stats.json` in a temporary copy of the
   workflow (benchmarks/workdir.py), config.yaml's defaults with `dataset.id` = the JSONL:
   download_dataset + preprocess_dataset + format_dataset. The base model (prepare_base_model)
   is built before the clock starts.
3. **training's data loading**: a fresh process that has imported torch and transformers and
   loaded the tokenizer opens `<formatted>/train.tokens.arrow` (tokens.open_tokens), reads its
   `length` column and orders it as the length-grouped sampler does (when
   training.fast_path.group_by_length is on), and collates the sampler's first
   per_device_train_batch_size examples with training.data.Collator: MB of RSS added and seconds
   from opening to the first batch. If format_dataset wrote no token file, the output says so and
   the benchmark writes one from `train.parquet` with tokens.TokensWriter and measures that.

Wall time is the whole command, start-up included, on both sides (`snakemake` builds its DAG,
`python` imports datasets). Peak RSS, both sides: the largest sum of RSS over a process tree,
sampled every 0.1 s with psutil (the datasets side: the Python process and its num_proc workers;
snaketune: per rule, the script process and its children). Snakemake's own `benchmark:` TSV
`max_rss` (the same sum, but sampled every 0.5 s, then every 30 s after ~15 s, so it can miss a
long job's peak) is printed beside; the goals are judged on the larger of the two. A sum over a
tree counts pages the forked workers share with their parent once per process, as Snakemake does;
the largest single process's peak is printed too.

Printed: the CPU and cores, then per size a table (wall s, rows/s, snaketune/datasets, peak RSS
per stage, the ratio of each stage's peak to the smallest size's, data loading MB and seconds to
the first batch) with the goals beside: wall <= 1.0x datasets; each stage's peak <= 1 GB at 1M
rows and <= 1.3x its peak at the smallest size (100k by default); data loading <= 300 MB, first
batch within 10 s. `--json out.json` writes everything measured.

Usage: python benchmarks/bench_data_scale.py --rows 100000 1000000 [--procs 2] [--json out.json]
       [--workdir DIR --keep]
Takes ~1 minute at --rows 2000 (start-up, the base model, ~10 s a side). The default sizes take
roughly half an hour to an hour on 2 cores, extrapolated from small runs: generating 1M rows ~25 s
(0.4 GB of JSONL); the datasets side tokenizes ~1,500 rows/s on 2 processes (~12 min for 1M rows),
and snaketune's side takes about as long if it meets its goal. Run it alone: both sides use every
core, and a shared machine makes the wall times and the ratio meaningless.
"""

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml
from machine import cpu_model
from workdir import REPO, workflow_copy

STAGES = ("download_dataset", "preprocess_dataset", "format_dataset")
GOAL_WALL_RATIO = 1.0  # snaketune wall <= 1.0x the datasets pipeline's
GOAL_STAGE_MB = 1024  # each stage's peak at 1M rows
GOAL_STAGE_ROWS = 1_000_000
GOAL_GROWTH = 1.3  # peak at the largest size <= 1.3x the peak at the smallest
GOAL_LOADING_MB = 300
GOAL_FIRST_BATCH_S = 10.0
POLL_S = 0.1


class TreeSampler(threading.Thread):
    """Peak RSS of a process tree, sampled every POLL_S: the sum over all its processes, and per
    label, where a process is labelled by the first of `labels` in its own command line or else
    inherits its parent's label (a rule's script, then anything the script starts)."""

    def __init__(self, pid: int, labels: tuple[str, ...] = ()):
        super().__init__(daemon=True)
        self.root, self.labels = psutil.Process(pid), labels
        self.peak_mb: dict[str, float] = {"total": 0.0, "largest_process": 0.0}
        self._own: dict[int, str | None] = {}  # pid -> label from its own command line
        self._done = threading.Event()

    def _own_label(self, proc: psutil.Process) -> str | None:
        if proc.pid not in self._own:
            try:
                cmd = " ".join(proc.cmdline())
            except psutil.Error:
                return None
            self._own[proc.pid] = next((lab for lab in self.labels if f".{lab}.py" in cmd), None)
        return self._own[proc.pid]

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        rss, parent = {}, {}
        for proc in procs:
            try:
                rss[proc.pid] = proc.memory_info().rss
                parent[proc.pid] = proc.ppid()
            except psutil.Error:
                continue
        own = {p.pid: self._own_label(p) for p in procs if p.pid in rss}

        def label(pid: int) -> str | None:
            while pid in own:
                if own[pid]:
                    return own[pid]
                pid = parent[pid]
            return None

        sums = {"total": sum(rss.values()) / 2**20, "largest_process": max(rss.values(), default=0) / 2**20}
        for pid, value in rss.items():
            if (lab := label(pid)) is not None:
                sums[lab] = sums.get(lab, 0.0) + value / 2**20
                sums[f"{lab}:largest"] = max(sums.get(f"{lab}:largest", 0.0), value / 2**20)
        for lab, mb in sums.items():
            self.peak_mb[lab] = max(self.peak_mb.get(lab, 0.0), mb)

    def run(self) -> None:
        while not self._done.wait(POLL_S):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()


def measured(cmd: list[str], log: Path, labels: tuple[str, ...] = (), **kw) -> tuple[float, dict]:
    """(wall seconds, peak RSS MB per label and in total) of a command; its output goes to `log`."""
    start = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)
        sampler = TreeSampler(proc.pid, labels)
        sampler.start()
        rc = proc.wait()
    wall = time.perf_counter() - start
    sampler.stop()
    if rc:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"{' '.join(map(str, cmd[:5]))} ... failed (exit {rc}); the end of {log}:\n{tail}")
    return wall, sampler.peak_mb


def clean_env() -> dict:
    """The environment without the variables that override the config's model and dataset."""
    return {k: v for k, v in os.environ.items() if k not in ("MODEL_ID", "DATASET")}


def snakemake_cmd(procs: int, cfg: Path, *targets: str) -> list[str]:
    # the targets first: --configfile takes every value after it
    return [sys.executable, "-m", "snakemake", *targets, "--cores", str(procs), "--configfile", str(cfg)]


# ---------------------------------------------------------------- children (fresh processes)


def child_datasets(spec: dict) -> dict:
    """The plain datasets pipeline (runs in its own process, measured from outside)."""
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    templates, system_prompt, columns = spec["messages"], spec["system_prompt"], spec["columns"]

    def to_messages(batch):
        out = []
        for i in range(len(batch[columns["question"]])):
            values = {name: batch[col][i] for name, col in columns.items()}
            values["system_prompt"] = system_prompt
            out.append([{"role": m["role"], "content": m["content"].format(**values)} for m in templates])
        return {"messages": out}

    def render(batch):
        prompts = [chat[:-1] for chat in batch["messages"]]
        return {
            "text": tok.apply_chat_template(batch["messages"], tokenize=False),
            "prompt_text": tok.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True),
        }

    def tokenize(batch):
        return {
            "input_ids": tok(batch["text"], add_special_tokens=False)["input_ids"],
            "prompt_ids": tok(batch["prompt_text"], add_special_tokens=False)["input_ids"],
        }

    procs = spec["procs"]
    ds = datasets.load_dataset("json", data_files=spec["data"], split="train")
    ds = ds.map(to_messages, batched=True, num_proc=procs, remove_columns=ds.column_names)
    ds = ds.map(render, batched=True, num_proc=procs)
    ds = ds.map(tokenize, batched=True, num_proc=procs)
    ds.to_parquet(spec["out"])
    return {"rows": len(ds)}


def child_loading(spec: dict) -> dict:
    """Training's data loading: what it measured."""
    import torch  # noqa: F401  (imported before the first measurement, as in the train stage)
    import transformers  # noqa: F401
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from workflow_scripts.data.tokens import open_tokens
    from workflow_scripts.models.loading import load_tokenizer
    from workflow_scripts.training.data import Collator, plain_lengths

    tok = load_tokenizer(spec["model"])
    collator = Collator(tok.pad_token_id, pack=spec["packing"], max_length=spec["max_length"])
    gc.collect()
    me = psutil.Process()
    before = me.memory_info().rss
    start = time.perf_counter()
    ds = open_tokens(spec["tokens"])
    opened = time.perf_counter()
    if spec["group_by_length"]:  # as snaketune's trainer builds it (trainer.SnaketuneTrainer)
        # lengths as snaketune's trainer hands them to the sampler (training.data.plain_lengths)
        sampler = LengthGroupedSampler(
            spec["batch"] * spec["accumulation"], lengths=plain_lengths(ds["length"])
        )
        first = list(iter(sampler))[: spec["batch"]]
    else:
        first = list(range(spec["batch"]))
    ordered = time.perf_counter()
    batch = collator(
        ds.__getitems__(first)
    )  # rows as the DataLoader fetches them, labels made by the collator
    done = time.perf_counter()
    after = me.memory_info().rss
    return {
        "rows": len(ds),
        "mb_added": (after - before) / 2**20,
        "seconds_to_first_batch": done - start,
        "seconds_open": opened - start,
        "seconds_lengths_and_order": ordered - opened,
        "seconds_collate": done - ordered,
        "batch_shape": list(batch["input_ids"].shape),
        "group_by_length": spec["group_by_length"],
    }


def child_parallelism(spec: dict) -> dict:
    """format_dataset's two candidate kinds of parallelism on the same preprocessed train split:
    one process whose tokenizer runs its own thread pool (rendering serial in Python), and the
    stage's worker processes (each renders and tokenizes, the tokenizer's pool off)."""
    from workflow_scripts.data import formatting
    from workflow_scripts.data.streams import batches_of

    train, model, procs = spec["train"], spec["model"], spec["procs"]
    probe = next(batches_of(train, rows=formatting.PROBE_ROWS))
    renderer, backend, why = formatting.prepare_light(
        model, spec["max_length"], spec["overlength"], {}, probe
    )
    if why:
        return {"error": why}
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the tokenizer's own pool, one thread per core
    light = formatting.Formatter(
        renderer, formatting._encoder(backend), spec["max_length"], spec["overlength"]
    )
    start = time.perf_counter()
    rows = sum(light.train_batch(batch)[0].num_rows for batch in batches_of(train))
    threads_s = time.perf_counter() - start
    start = time.perf_counter()
    workers = formatting.Workers(procs, model, spec, probe, rows=rows)
    started = time.perf_counter()
    try:
        assert sum(r[0].num_rows for r in workers.map(("train", b) for b in batches_of(train))) == rows
    finally:
        workers.close()
    return {
        "rows": rows,
        "tokenizer_threads_s": threads_s,
        "worker_processes_s": time.perf_counter() - started,
        "worker_startup_s": started - start,
    }


def side_parallelism(wf: Path, exp, cfg: dict, procs: int, folder: Path) -> dict:
    spec = {
        "train": str(wf / exp.preprocessed / "train.parquet"),
        "model": str(wf / exp.base_model),
        "procs": procs,
        "max_length": cfg["training"]["max_length"],
        "overlength": cfg["training"]["overlength"],
    }
    _, _, info = run_child("parallelism", spec, folder / "parallelism.log")
    return info


def run_child(kind: str, spec: dict, log: Path) -> tuple[float, dict, dict]:
    """(wall s, peak RSS MB, what the child returned) of a child run in a fresh process."""
    out = log.with_suffix(".json")
    cmd = [sys.executable, __file__, "--child", kind, json.dumps(spec), str(out)]
    env = {**clean_env(), **spec.get("env", {})}
    wall, peak = measured(cmd, log, cwd=REPO, env=env)
    return wall, peak, json.loads(out.read_text())


# ---------------------------------------------------------------- the sides


def make_data(rows: int, folder: Path) -> Path:
    folder.mkdir()
    out = folder / f"finqa_{rows}.jsonl"  # no split word in the name: a single file is the train pool
    cmd = [sys.executable, str(REPO / "data/sample/make_sample.py"), "--rows", str(rows), "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def side_datasets(data: Path, model: Path, cfg: dict, procs: int, folder: Path) -> dict:
    cache = folder / "hf_cache"
    mf = cfg["messages_format"]
    spec = {
        "data": str(data),
        "model": str(model),
        "out": str(folder / "formatted.parquet"),
        "procs": procs,
        "messages": mf["messages_format"]["messages"],
        "system_prompt": mf["messages_format"]["system_prompt"] or "",
        "columns": mf["training_columns"],
        "env": {"HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
    }
    try:
        wall, peak, info = run_child("datasets", spec, folder / "datasets.log")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        Path(spec["out"]).unlink(missing_ok=True)
    return {
        "wall_s": wall,
        "peak_mb": peak["total"],
        "largest_process_mb": peak["largest_process"],
        "rows_out": info["rows"],
    }


def read_tsv_max_rss(path: Path) -> float | None:
    if not path.is_file():
        return None
    header, *rows = [line.split("\t") for line in path.read_text().splitlines()]
    values = [float(r[header.index("max_rss")]) for r in rows if r[header.index("max_rss")] != "NA"]
    return max(values) if values else None


def side_snaketune(wf: Path, cfg_file: Path, exp, procs: int, log: Path) -> dict:
    target = f"{exp.formatted}/stats.json"
    wall, peak = measured(snakemake_cmd(procs, cfg_file, target), log, STAGES, cwd=wf, env=clean_env())
    folders = {
        "download_dataset": exp.data,
        "preprocess_dataset": exp.preprocessed,
        "format_dataset": exp.formatted,
    }
    stages = {}
    for stage, folder in folders.items():
        tsv = wf / "results/shared/benchmarks" / stage / f"{Path(folder).name}.tsv"
        stages[stage] = {
            "polled_peak_mb": peak.get(stage),
            "largest_process_mb": peak.get(f"{stage}:largest"),
            "snakemake_max_rss_mb": read_tsv_max_rss(tsv),
        }
        if tsv.is_file():
            header, row = [line.split("\t") for line in tsv.read_text().splitlines()[:2]]
            stages[stage]["snakemake_s"] = float(row[header.index("s")])
        known = [v for v in (peak.get(stage), stages[stage]["snakemake_max_rss_mb"]) if v is not None]
        stages[stage]["peak_mb"] = max(known) if known else None
    return {"wall_s": wall, "stages": stages}


def write_tokens_from_parquet(parquet: Path, out: Path) -> None:
    """A token file made from format_dataset's train.parquet, batch by batch (tokens.TokensWriter)."""
    import pyarrow.parquet as pq

    from workflow_scripts.data.tokens import TokensWriter

    writer = TokensWriter(out)
    for batch in pq.ParquetFile(parquet).iter_batches(
        batch_size=20_000, columns=["input_ids", "prompt_length"]
    ):
        writer.write(batch.column("input_ids").to_pylist(), batch.column("prompt_length").to_pylist())
    writer.close()


def side_loading(wf: Path, exp, cfg: dict, folder: Path) -> dict:
    tokens = wf / exp.formatted / "train.tokens.arrow"
    note = "format_dataset's"
    if not tokens.is_file():
        note = f"NONE from format_dataset: measured on a {tokens.name} written here from train.parquet"
        tokens = folder / "train.tokens.arrow"
        write_tokens_from_parquet(wf / exp.formatted / "train.parquet", tokens)
    training = cfg["training"]
    spec = {
        "tokens": str(tokens),
        "model": str(wf / exp.base_model),
        "batch": training["per_device_train_batch_size"],
        "accumulation": training["gradient_accumulation_steps"],
        "group_by_length": training["fast_path"]["group_by_length"],
        "packing": training["fast_path"]["packing"],
        "max_length": training["max_length"],
    }
    _, _, info = run_child("loading", spec, folder / "loading.log")
    return {**info, "tokens_file": note}


# ---------------------------------------------------------------- report


def fmt_mb(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} MB"


def ratio_text(value: float | None, base: float | None) -> str:
    return "—" if value is None or not base else f"{value / base:.2f}x"


def ok(cond: bool | None) -> str:
    return "n/a" if cond is None else ("ok" if cond else "MISSED")


def report_size(r: dict, first: dict | None) -> None:
    rows, ds, sn, ld = r["rows"], r["datasets"], r["snaketune"], r["loading"]
    print(f"\n{rows:,} rows ({r['data_mb']:.0f} MB of JSONL)")
    print(f"  {'':22} {'wall':>8} {'rows/s':>9}  goal")
    print(f"  {'datasets (num_proc)':22} {ds['wall_s']:7.1f}s {rows / ds['wall_s']:9.0f}")
    print(
        f"  datasets peak RSS {fmt_mb(ds['peak_mb'])} (sum over the process and its workers; "
        f"largest process {fmt_mb(ds['largest_process_mb'])})"
    )
    if "error" in sn:
        print(f"  snaketune: FAILED: {sn['error']}")
        return
    ratio = sn["wall_s"] / ds["wall_s"]
    r["wall_ratio"] = ratio
    print(
        f"  {'snaketune (3 stages)':22} {sn['wall_s']:7.1f}s {rows / sn['wall_s']:9.0f}"
        f"  snaketune/datasets {ratio:.2f} (<= {GOAL_WALL_RATIO:.1f}: {ok(ratio <= GOAL_WALL_RATIO)})"
    )
    head = (
        f"  {'stage':20} {'peak':>8} {'polled':>8} {'snakemake':>10} {'largest':>8} {'rule s':>7} "
        f"{'/datasets':>9} {'vs first':>9}  goal"
    )
    print(head)
    for stage, s in sn["stages"].items():
        first_peak = first["snaketune"]["stages"][stage]["peak_mb"] if first else None
        growth = s["peak_mb"] / first_peak if s["peak_mb"] and first_peak else None
        s["growth_vs_first"] = growth
        goals = []
        if rows >= GOAL_STAGE_ROWS:
            goals.append(
                f"<= {GOAL_STAGE_MB} MB: {ok(None if s['peak_mb'] is None else s['peak_mb'] <= GOAL_STAGE_MB)}"
            )
        if growth is not None:
            goals.append(f"<= {GOAL_GROWTH}x: {ok(growth <= GOAL_GROWTH)}")
        print(
            f"  {stage:20} {fmt_mb(s['peak_mb']):>8} {fmt_mb(s['polled_peak_mb']):>8} "
            f"{fmt_mb(s['snakemake_max_rss_mb']):>10} {fmt_mb(s['largest_process_mb']):>8} "
            f"{s.get('snakemake_s', float('nan')):6.1f}s "
            f"{ratio_text(s['peak_mb'], ds['peak_mb']):>9} {ratio_text(s['peak_mb'], first_peak):>9}  "
            f"{'; '.join(goals)}"
        )
    if "error" in ld:
        print(f"  training data loading: FAILED: {ld['error']}")
        return
    print(
        f"  training data loading, {ld['rows']:,} train rows; token file: {ld['tokens_file']}\n"
        f"    +{ld['mb_added']:.0f} MB (<= {GOAL_LOADING_MB}: {ok(ld['mb_added'] <= GOAL_LOADING_MB)}), "
        f"first batch {ld['seconds_to_first_batch']:.2f} s (<= {GOAL_FIRST_BATCH_S:.0f}: "
        f"{ok(ld['seconds_to_first_batch'] <= GOAL_FIRST_BATCH_S)}) [open {ld['seconds_open']:.2f} s, "
        f"lengths + order {ld['seconds_lengths_and_order']:.2f} s, collate {ld['seconds_collate']:.3f} s]"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":  # a measured child process
        _, _, kind, spec, out = sys.argv
        sys.path.insert(0, str(REPO))
        children = {"datasets": child_datasets, "loading": child_loading, "parallelism": child_parallelism}
        result = children[kind](json.loads(spec))
        Path(out).write_text(json.dumps(result))
        return

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000], help="dataset sizes")
    parser.add_argument("--procs", type=int, default=os.cpu_count(), help="num_proc / snakemake --cores")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--workdir", type=Path, help="where data and the workflow copy go (new or empty)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    for name in ("MODEL_ID", "DATASET"):  # the config resolved here must be the one snakemake runs
        os.environ.pop(name, None)
    from workflow_scripts.config import load_and_resolve
    from workflow_scripts.sweeps.points import expand

    if args.workdir:
        if args.workdir.exists() and any(args.workdir.iterdir()):
            sys.exit(f"--workdir {args.workdir}: not empty")
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-data-scale-"))).resolve()
    cores = os.cpu_count()
    result = {"cpu": cpu_model(), "cores": cores, "procs": args.procs, "sizes": []}
    print(f"CPU: {result['cpu']} ({cores} cores); num_proc / --cores: {args.procs}")
    try:
        wf = workflow_copy(work / "wf")
        for rows in sorted(args.rows):
            folder = work / f"rows_{rows}"
            data = make_data(rows, folder)
            cfg_file = folder / "config.yaml"
            cfg_file.write_text(yaml.safe_dump({"dataset": {"id": str(data)}}))
            cfg = load_and_resolve(wf / "config.yaml", {"dataset": {"id": str(data)}})
            exp = expand(cfg)[0]
            log = folder / "snakemake.log"
            if not (wf / exp.base_model).is_dir():  # built once, before any clock starts
                measured(snakemake_cmd(args.procs, cfg_file, exp.base_model), log, cwd=wf, env=clean_env())
            first = next((s for s in result["sizes"] if "error" not in s["snaketune"]), None)
            r = {"rows": rows, "data_mb": data.stat().st_size / 2**20}
            result["sizes"].append(r)
            r["datasets"] = side_datasets(data, wf / exp.base_model, cfg, args.procs, folder)
            try:
                r["snaketune"] = side_snaketune(wf, cfg_file, exp, args.procs, log)
                r["loading"] = side_loading(wf, exp, cfg, folder)
            except (RuntimeError, OSError, ValueError) as exc:  # reported; the next size still runs
                r.setdefault("snaketune", {"error": str(exc)})
                r["loading"] = {"error": str(exc) if "error" not in r["snaketune"] else "no formatted data"}
            report_size(r, first)
            if first is None and "error" not in r["snaketune"]:  # the smallest size: which parallelism
                p = r["parallelism"] = side_parallelism(wf, exp, cfg, args.procs, folder)
                if "error" in p:
                    print(f"  parallelism: not measured ({p['error']})")
                else:
                    print(
                        f"  format's parallelism on {p['rows']:,} train rows (work only): one process + "
                        f"tokenizer threads {p['tokenizer_threads_s']:.1f} s, {args.procs} worker processes "
                        f"{p['worker_processes_s']:.1f} s (+{p['worker_startup_s']:.1f} s to check the light "
                        f"formatter and start them): processes "
                        f"{p['tokenizer_threads_s'] / p['worker_processes_s']:.2f}x as fast"
                    )
    finally:
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        if args.keep:
            print(f"\nworkdir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
