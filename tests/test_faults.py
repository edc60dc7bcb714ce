"""Fault injection: SIGKILL every rule part-way through, and a disk that fills while a stage writes.

For each rule of the tiny workflow, in the order of the DAG (a rule runs for the first time in its
own test, on the outputs the tests before it left, so no upstream job runs twice): start Snakemake
for that rule's outputs in a new session, poll the output folders for the first
``.<name>.tmp-<random>`` sibling that ``atomic_path`` writes (or for the rule's log, see
``TRIGGERS``), SIGKILL the whole process group, ``snakemake --unlock``, re-run, and check that the
job was re-done, every output parses or loads, and no ``.tmp-`` debris is left under results/ or
models/. Nothing is hooked into product code; each rule's outputs and log are read from a dry run.
"""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import SNAKEMAKE, new_workflow, sample_rows, snakemake_env
from helpers import smk as run_smk

TMP_MARK = ".tmp-"
POLL_S = 0.01
TIMEOUT_S = 300
MAX_STEPS = 4

# In the order of the DAG.
RULES = [
    "prepare_base_model",
    "download_dataset",
    "preprocess_dataset",
    "format_dataset",
    "train",
    "merge",
    "eval_base",
    "general_base",
    "eval_finetuned",
    "general_finetuned",
    "compare",
    "experiment_index",
]
# What fires the kill, tried in order until a kill lands before Snakemake records the job as
# complete: "tmp", the first temp sibling of one of the rule's outputs; "log", the rule's log file
# appears (the stage has imported its libraries and set up logging, and written nothing yet).
# Default ("tmp", "log"). Where it is "tmp", the write is slow enough for a 10 ms poll: the first
# parquet write imports pyarrow inside the atomic_path block (download, format), a model folder is
# saved (and for merge reloaded and checked) inside it, compare renders its plots inside it; train's
# first temp sibling is the adapter folder, written after checkpoint-4, so the re-run resumes from
# a checkpoint at max_steps. The rules below write a few small JSON/JSONL files within
# milliseconds: a kill mid-write cannot be landed reliably, so they are killed when the log appears.
TRIGGERS = {
    "preprocess_dataset": ("log", "log"),
    "eval_base": ("log", "log"),
    "general_base": ("log", "log"),
    "eval_finetuned": ("log", "log"),
    "general_finetuned": ("log", "log"),
    "experiment_index": ("log", "log"),
}


def smk(wf: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_smk(wf, *args, check=check, timeout=TIMEOUT_S)


@dataclass
class Job:
    rule: str
    outputs: list[str] = field(default_factory=list)  # relative to the workflow
    log: str = ""


def plan(wf: Path, config_file: Path) -> dict[str, Job]:
    """Each rule's outputs and log, from a dry run of the whole workflow (nothing built yet)."""
    proc = smk(wf, "-n", "--configfile", str(config_file))
    jobs: dict[str, Job] = {}
    job = None
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            job = jobs.setdefault(m.group(1), Job(m.group(1)))
        elif job is not None and (m := re.match(r"^\s+(output|log): (.+)$", line)):
            if m.group(1) == "output" and not job.outputs:
                job.outputs = m.group(2).split(", ")
            elif m.group(1) == "log" and not job.log:
                job.log = m.group(2)
        elif not line.strip():
            job = None
    return jobs


@dataclass
class Workflow:
    """A workflow copy with a tiny config, shared by the tests of this module."""

    wf: Path
    config_file: Path
    jobs: dict[str, Job]

    def args(self, *extra: str, config_file: Path | None = None) -> list[str]:
        return [*extra, "--configfile", str(config_file or self.config_file)]


TINY = {
    # a checkpoint every 2 steps: checkpoint-4 exists when the adapter is written
    "training": {
        "max_steps": MAX_STEPS,
        "eval_steps": MAX_STEPS,
        "save_steps": 2,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
    },
    "evaluation": {
        "max_examples": 4,
        "max_new_tokens": 4,
        "batch_size": 4,
        "metrics": ["answer_accuracy"],
        "bootstrap_samples": 200,
    },
    "wandb": {"mode": "disabled"},
}


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, tiny_model_dir) -> Workflow:
    root = tmp_path_factory.mktemp("faults")
    wf = new_workflow(root / "wf")
    sample = root / "sample.jsonl"
    sample.write_text("".join(json.dumps(r) + "\n" for r in sample_rows(120)))
    config = {
        **TINY,
        "experiment": "faults",
        "model": {"id": str(tiny_model_dir), "name": "tiny"},
        "dataset": {"id": str(sample)},
    }
    config_file = wf / "faults.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return Workflow(wf, config_file, plan(wf, config_file))


# --- what a valid output is -------------------------------------------------------------------


def check_tokens(path: Path) -> None:
    from workflow_scripts.data.tokens import open_tokens

    ds = open_tokens(path)  # a whole Arrow stream with the token columns
    assert len(ds) > 0 and ds[0]["length"] == len(ds[0]["input_ids"]), path


def check_parquet(path: Path) -> None:
    import pandas as pd

    assert len(pd.read_parquet(path)) > 0, path


def check_json(path: Path) -> None:
    assert json.loads(path.read_text()), path


def check_jsonl(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert lines and all(json.loads(line) for line in lines), path


def check_csv(path: Path) -> None:
    import pandas as pd

    pd.read_csv(path)  # its rows are checked in the train test


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82"), f"{path} is cut short"


def check_text(path: Path) -> None:
    assert path.read_text().strip(), path


def check_model_dir(path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (path / name).is_file(), f"{path} lacks {name}"
    AutoModelForCausalLM.from_pretrained(path)
    AutoTokenizer.from_pretrained(path)


def check_base_model(path: Path) -> None:
    check_model_dir(path)
    assert json.loads((path / "manifest.json").read_text())["weights_sha256"]["model.safetensors"]


def check_adapter(path: Path) -> None:
    from safetensors.torch import load_file

    assert json.loads((path / "adapter_config.json").read_text())["r"]
    assert load_file(path / "adapter_model.safetensors")


def check_deployment(path: Path) -> None:
    check_model_dir(path)
    assert json.loads((path / "merge_report.json").read_text())["passed"]
    check_text(path / "README.md")


CHECKS = {
    ".parquet": check_parquet,
    ".arrow": check_tokens,
    ".json": check_json,
    ".jsonl": check_jsonl,
    ".csv": check_csv,
    ".png": check_png,
    ".md": check_text,
}
# the folder outputs (no suffix), by rule
DIR_CHECKS = {"prepare_base_model": check_base_model, "train": check_adapter, "merge": check_deployment}


def check_output(rule: str, path: Path) -> None:
    if path.suffix in CHECKS:
        assert path.is_file(), f"{path} missing"
        CHECKS[path.suffix](path)
    else:
        assert path.is_dir(), f"{path} missing"
        DIR_CHECKS[rule](path)


def debris(root: Path) -> list[Path]:
    """Temp siblings (``atomic_path``'s ``.<name>.tmp-<random>``) under results/ and models/."""
    return sorted(p for top in ("results", "models") for p in (root / top).rglob(f"*{TMP_MARK}*"))


def remove(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def redone(text: str, rule: str) -> bool:
    return "Finished jobid: " in text and f"(Rule: {rule})" in text


# --- the kill ---------------------------------------------------------------------------------


@dataclass
class Kill:
    trigger: str
    fired_on: str | None  # what fired the kill, relative to the workflow; None: the run ended first
    temps_left: list[str]  # temp siblings of the rule's outputs right after the kill
    outputs_left: list[str]  # outputs (complete or not) right after the kill
    seconds: float
    checkpoint_left: bool = False
    unlock_s: float | None = None
    rerun_s: float | None = None


def _group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            alive.append(int(entry.name))
    return alive


def _wait_group_gone(pgid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (alive := _group_alive(pgid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive, f"processes {alive} of the killed run survived SIGKILL"


def kill_run(w: Workflow, job: Job, trigger: str) -> Kill:
    """Run Snakemake for ``job``'s outputs; SIGKILL its whole process group when ``trigger`` fires."""
    outputs = [w.wf / o for o in job.outputs]
    watch = sorted({o.parent for o in outputs})
    prefixes = tuple(f".{o.name}{TMP_MARK}" for o in outputs)
    log = w.wf / job.log
    log.unlink(missing_ok=True)  # "log" fires on this run's log, not an earlier one's
    t0 = time.monotonic()
    with open(w.wf / f"kill-{job.rule}-{trigger}.out", "w") as out:
        proc = subprocess.Popen(
            [*SNAKEMAKE, "--cores", "2", *w.args(*job.outputs)],
            cwd=w.wf,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=snakemake_env(),
            start_new_session=True,  # its own process group: the jobs, and only they, die with it
        )
        fired_on = None
        try:
            while fired_on is None and proc.poll() is None and time.monotonic() - t0 < TIMEOUT_S:
                time.sleep(POLL_S)
                if trigger == "log":
                    fired_on = job.log if log.exists() else None
                    continue
                for folder in watch:
                    with contextlib.suppress(FileNotFoundError):
                        hit = next((n for n in os.listdir(folder) if n.startswith(prefixes)), None)
                        if hit:
                            fired_on = str((folder / hit).relative_to(w.wf))
                            break
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
    _wait_group_gone(proc.pid)
    temps = [p for d in watch if d.is_dir() for p in d.iterdir() if p.name.startswith(prefixes)]
    return Kill(
        trigger,
        fired_on,
        sorted(str(p.relative_to(w.wf)) for p in temps),
        [o for o in job.outputs if (w.wf / o).exists()],
        round(time.monotonic() - t0, 1),
    )


def kill_unlock_rerun(w: Workflow, job: Job) -> list[Kill]:
    outputs = [w.wf / o for o in job.outputs]
    attempts = []
    for trigger in TRIGGERS.get(job.rule, ("tmp", "log")):
        kill = kill_run(w, job, trigger)
        attempts.append(kill)
        if kill.fired_on is None:  # the run ended before the trigger: try the next one
            remove(outputs)
            continue
        if job.rule == "train":
            kill.checkpoint_left = any(
                (w.wf / "results").glob("*/checkpoints/checkpoint-*/trainer_state.json")
            )
        assert list((w.wf / ".snakemake" / "locks").iterdir()), "a killed run leaves its lock behind"
        t0 = time.monotonic()
        smk(w.wf, *w.args("--unlock"))
        kill.unlock_s = round(time.monotonic() - t0, 1)
        rerun = smk(w.wf, *w.args(*job.outputs))
        kill.rerun_s = round(time.monotonic() - t0 - kill.unlock_s, 1)
        text = rerun.stdout + rerun.stderr
        if redone(text, job.rule):
            return attempts
        # The kill landed after Snakemake had recorded the job as complete: try the next trigger.
        assert "Nothing to be done" in text, text[-3000:]
        remove(outputs)
    pytest.fail(f"{job.rule}: no kill landed before the job completed: {attempts}")


def test_every_rule_of_the_dag_is_killed(workflow):
    """RULES is exactly the rules of the test config's DAG: a new rule is killed too, and no rule in
    RULES goes untested because it left the DAG."""
    dag = set(workflow.jobs) - {"all"}
    assert dag == set(RULES), (
        f"in the DAG but not in RULES (add them, in DAG order): {sorted(dag - set(RULES))}; "
        f"in RULES but not in the DAG (remove them, or change TINY so they run): {sorted(set(RULES) - dag)}"
    )


@pytest.mark.e2e
@pytest.mark.parametrize("rule", RULES)
def test_sigkill_part_way_then_unlock_and_rerun(workflow, rule):
    # the DAG is fixed by this module's config (TINY): a rule of RULES missing from it is a failure
    assert rule in workflow.jobs, (
        f"{rule} is not in the DAG of {workflow.config_file.name}: {sorted(workflow.jobs)}"
    )
    job = workflow.jobs[rule]
    assert job.outputs and job.log, job
    t0 = time.monotonic()
    attempts = kill_unlock_rerun(workflow, job)
    for out in job.outputs:
        check_output(rule, workflow.wf / out)
    assert debris(workflow.wf) == [], "temp siblings left after the re-run"
    print(f"\n{rule}: {[a.__dict__ for a in attempts]}; {time.monotonic() - t0:.1f}s in all")
    if rule == "train":
        check_resumed_training(workflow, job, attempts[-1])


def check_resumed_training(w: Workflow, job: Job, kill: Kill) -> None:
    import pandas as pd

    log_text = (w.wf / job.log).read_text()
    run_json = next(w.wf / o for o in job.outputs if o.endswith("run.json"))
    assert json.loads(run_json.read_text())["global_step"] == MAX_STEPS
    if kill.checkpoint_left:
        assert "resuming from checkpoint-" in log_text
    metrics = pd.read_csv(next(w.wf / o for o in job.outputs if o.endswith("metrics.csv")))
    logged = set(metrics.loc[metrics["loss"].notna(), "step"])
    assert logged == set(range(1, MAX_STEPS + 1)), f"metrics.csv logs a loss at steps {sorted(logged)}"


# --- a disk that fills while a stage writes ---------------------------------------------------


def _mount_tmpfs(path: Path, size_kb: int) -> None:
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def can_mount(tmp_path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    probe = tmp_path / "probe"
    probe.mkdir()
    try:
        _mount_tmpfs(probe, 16)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {getattr(exc, 'stderr', '') or exc}")
    _umount(probe)


def pages(path: Path) -> int:
    return math.ceil(path.stat().st_size / 4096)


@pytest.mark.e2e
def test_disk_full_while_preprocess_writes(workflow, can_mount):
    """A tmpfs as the folder that holds preprocess_dataset's output folder, with room for every split
    but the last: the job fails on ENOSPC, nothing that looks complete stays, and once there is
    room (the same file system grows) a plain re-run works."""
    wf = workflow.wf
    config = yaml.safe_load(workflow.config_file.read_text())
    # A filter no sample row is near: a preprocess folder of its own with the same rows (the
    # raw splits are shared).
    config.update(experiment="enospc", filters={"max_chars": {"question": 8001}})
    config_file = wf / "enospc.yaml"
    config_file.write_text(yaml.safe_dump(config))
    job = plan(wf, config_file)["preprocess_dataset"]
    same_rows = [wf / o for o in workflow.jobs["preprocess_dataset"].outputs]
    assert job.outputs != workflow.jobs["preprocess_dataset"].outputs
    outputs = [wf / o for o in job.outputs]
    assert [o.suffix for o in outputs] == [".parquet"] * 3 + [".json"], job.outputs  # splits, then report
    args = workflow.args(*job.outputs, config_file=config_file)
    if not all(p.exists() for p in same_rows):  # this test alone: a run with room gives the sizes
        smk(wf, *args)
        same_rows = outputs
    need = sum(pages(p) for p in same_rows[:3])
    remove(outputs)
    disk = outputs[0].parent.parent  # results/shared/preprocessed (the output folder is made on it)
    _mount_tmpfs(disk, 4 * (need - 1))  # one page short: the last split does not fit
    try:
        proc = smk(wf, *args, check=False)
        text = proc.stdout + proc.stderr
        log_text = (wf / job.log).read_text()
        assert proc.returncode != 0, text[-3000:]
        # one clear line naming the file that did not fit, not a bare OSError traceback
        assert re.search(r"ERROR.*no space left on device while writing \S+test\.parquet", log_text), (
            log_text[-3000:]
        )
        print("\nENOSPC as the user sees it, end of the log:\n" + "\n".join(log_text.splitlines()[-4:]))
        # Snakemake removes the outputs of the failed job, also the splits written completely
        assert [p for p in outputs if p.exists()] == [], (
            "a failed job must not leave outputs that look complete"
        )
        assert not list(disk.rglob(f"*{TMP_MARK}*")), "temp siblings left on the full disk"
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True, capture_output=True)
        rerun = smk(wf, *args)  # no unlock: the failed run released its lock
        assert redone(rerun.stdout + rerun.stderr, job.rule)
        for path in outputs:
            check_output(job.rule, path)
        assert not list(disk.rglob(f"*{TMP_MARK}*"))
    finally:
        _umount(disk)
