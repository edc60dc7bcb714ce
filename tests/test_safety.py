"""Secrets never reach a log or file (every stream is masked), and atomic writes leave no debris and
normal permissions (issue 11, items 2, 4 and 5)."""

import io
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from workflow_scripts import files
from workflow_scripts.files import atomic_path, write_json
from workflow_scripts.logs import MaskedStream, run_logged

REPO = Path(__file__).resolve().parent.parent
HF = "hf_SECRETtoken123456"
WANDB = "wandb-secret-0123456789abcdef"


@pytest.fixture
def secrets_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("WANDB_API_KEY", WANDB)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


# ---------------------------------------------------------------- masking, in process


def test_masked_stream_secret_split_over_writes(secrets_env):
    raw = io.StringIO()
    out = MaskedStream(raw)
    out.write(f"a {HF[:7]}")
    out.flush()  # a flush must not push out the start of a secret
    assert HF[:3] not in raw.getvalue()
    out.write(f"{HF[7:]} b {WANDB[:1]}")
    out.write(f"{WANDB[1:-1]}")
    out.write(f"{WANDB[-1]} c\n")
    out.buffer.write(f"bytes {HF}".encode()[:10])  # a byte write split inside the secret
    out.buffer.write(f"bytes {HF}\n".encode()[10:])
    out.write("tail h")  # held back: could be the start of HF_TOKEN
    assert raw.getvalue() == "a *** b *** c\nbytes ***\ntail "
    out.close()
    assert raw.getvalue().endswith("tail h") and HF not in raw.getvalue() and WANDB not in raw.getvalue()
    # a partial secret left at the very end is masked too
    out.write(f"end {HF[:-1]}")
    out.close()
    assert raw.getvalue().endswith("end ***")


def test_run_logged_masks_and_keeps_the_exit_code(secrets_env, monkeypatch):
    raw = io.StringIO()
    monkeypatch.setattr(sys, "stderr", MaskedStream(raw))
    code = "import os, sys; print('out', os.environ['HF_TOKEN']); print('err', os.environ['WANDB_API_KEY'], file=sys.stderr)"
    assert run_logged([sys.executable, "-c", code]).returncode == 0
    with pytest.raises(subprocess.CalledProcessError) as exc:
        run_logged([sys.executable, "-c", code + "; sys.exit(3)"], check=True)
    assert exc.value.returncode == 3
    text = raw.getvalue()
    assert text.count("out ***\n") == 2 and text.count("err ***\n") == 2
    assert HF not in text and WANDB not in text


# ---------------------------------------------------------------- masking, through a real Snakemake run

SNAKEFILE = """\
rule leak:
    output: "results/leak.txt"
    log: "logs/leak.log"
    script: "leak.py"
"""

SCRIPT_HEAD = f"""\
import logging, os, sys, warnings
sys.path.insert(0, {str(REPO)!r})
early = logging.getLogger("earlylib")  # a library handler made before the set-up, on the real stderr
early.addHandler(logging.StreamHandler(sys.stderr))
early.propagate = False
from workflow_scripts.logs import run_logged
from workflow_scripts.stage import StageError, snakemake_main
hf, wb = os.environ["HF_TOKEN"], os.environ["WANDB_API_KEY"]
"""

LEAKY_STAGE = """\
def stage(smk):
    print("printed", hf, wb)
    print("split", hf[:6], end="", flush=True)
    print(hf[6:], "end-split")
    sys.stdout.buffer.write(f"bytes {hf}\\n".encode())
    warnings.warn(f"warned {hf} {wb}")
    lib = logging.getLogger("somelib")
    lib.addHandler(logging.StreamHandler(sys.stderr))
    lib.propagate = False
    lib.warning("library %s %s", hf, wb)
    early.warning("early library %s", hf)
    logging.getLogger("snaketune.stage").info("root logger %s", wb)
    child = "import os, sys; print('child', os.environ['HF_TOKEN']); print('childerr', os.environ['WANDB_API_KEY'], file=sys.stderr)"
    run_logged([sys.executable, "-c", child], check=True)
    raise RuntimeError(f"boom {hf} {wb}")

snakemake_main(snakemake, stage)
"""

STAGE_ERROR = """\
def stage(smk):
    print("before the error")
    raise StageError(f"bad token {hf} for {wb}")

snakemake_main(snakemake, stage)
"""


def run_snakemake(workdir: Path, script: str) -> subprocess.CompletedProcess:
    (workdir / "Snakefile").write_text(SNAKEFILE)
    (workdir / "leak.py").write_text(SCRIPT_HEAD + script)
    env = {**os.environ, "HF_TOKEN": HF, "WANDB_API_KEY": WANDB}
    env.pop("HUGGING_FACE_HUB_TOKEN", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "-s", "Snakefile"],
        cwd=workdir,
        env=env,
        capture_output=True,
        timeout=300,
    )


def assert_no_secret_anywhere(workdir: Path, proc: subprocess.CompletedProcess) -> None:
    files = [p for p in workdir.rglob("*") if p.is_file()]
    assert any(".snakemake" in p.parts for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in (HF, WANDB):
            assert secret.encode() not in data, f"{secret} leaked into {path}"
    for secret in (HF, WANDB):
        assert secret.encode() not in proc.stdout + proc.stderr, f"{secret} leaked to the console"


@pytest.mark.e2e
def test_every_stream_of_a_stage_is_masked(tmp_path):
    proc = run_snakemake(tmp_path, LEAKY_STAGE)
    assert proc.returncode != 0, "the stage raises at the end"
    assert_no_secret_anywhere(tmp_path, proc)
    text = (tmp_path / "logs" / "leak.log").read_text()
    for expected in (
        "printed *** ***",
        "split *** end-split",
        "bytes ***",
        "warned *** ***",
        "library *** ***",
        "early library ***",
        "root logger ***",
        "child ***",
        "childerr ***",
        "RuntimeError: boom *** ***",
    ):
        assert expected in text, f"{expected!r} missing from the log:\n{text}"


@pytest.mark.e2e
def test_stage_error_message_is_masked(tmp_path):
    proc = run_snakemake(tmp_path, STAGE_ERROR)
    assert proc.returncode != 0
    assert_no_secret_anywhere(tmp_path, proc)
    text = (tmp_path / "logs" / "leak.log").read_text()
    assert "before the error" in text and "bad token *** for ***" in text
    assert b"ERROR: bad token *** for ***" in proc.stderr


# ---------------------------------------------------------------- atomic writes

UMASK_SCRIPT = """\
import os, sys
os.umask(int(sys.argv[2], 8))
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from workflow_scripts.files import atomic_path, write_json
out = Path(sys.argv[1])
write_json(out / "a.json", {"x": 1})
with atomic_path(out / "plain.bin") as tmp:
    tmp.write_bytes(b"x")
with atomic_path(out / "model", is_dir=True) as tmp:
    (tmp / "weights.bin").write_bytes(b"x")
    (tmp / "sub").mkdir()
"""


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    subprocess.run([sys.executable, "-c", UMASK_SCRIPT, str(tmp_path), oct(umask), str(REPO)], check=True)

    def mode(name):
        return stat.S_IMODE((tmp_path / name).stat().st_mode)

    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    assert mode("a.json") == file_mode
    assert mode("plain.bin") == file_mode
    assert mode("model") == dir_mode
    assert mode("model/weights.bin") == file_mode
    assert mode("model/sub") == dir_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "model", "plain.bin"]


def test_atomic_path_removes_stale_temp_siblings(tmp_path):
    stale_dir = tmp_path / ".x.tmp-abc"  # a killed earlier write of x (folder)
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "weights.bin").write_bytes(b"0" * 1000)
    (tmp_path / ".x.tmp-k3j_9zq1").write_text("half")  # ... and a file
    keep = [
        ".x.json",  # a sibling that merely starts with the name
        ".x.tmp-",  # no random part
        ".x.tmp-foo.tmp-abcd1234",  # the temp of another target, "x.tmp-foo"
        ".xy.tmp-abcd1234",  # the temp of "xy"
        "x.tmp-abcd1234",  # not hidden
    ]
    for name in keep:
        (tmp_path / name).write_text("keep")
    write_json(tmp_path / "x", {"ok": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "x"])


def test_failed_atomic_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError), atomic_path(tmp_path / "m", is_dir=True) as tmp:
        (tmp / "f").write_text("x")
        raise ValueError
    with pytest.raises(ValueError), atomic_path(tmp_path / "f.json") as tmp:
        raise ValueError
    assert list(tmp_path.iterdir()) == []


KILL_SCRIPT = """\
import sys, time
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from workflow_scripts.files import atomic_path
with atomic_path(sys.argv[1], is_dir=True) as tmp:
    (tmp / "weights.bin").write_bytes(b"0" * 1_000_000)
    print("written", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_sigkill_mid_write_leaves_no_debris_after_rerun(tmp_path):
    target = tmp_path / "models" / "merged"
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(target)]
    proc = subprocess.Popen([*cmd, "60", str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "written\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    debris = list(target.parent.iterdir())
    assert [p.name[: len(".merged.tmp-")] for p in debris] == [".merged.tmp-"], debris
    assert not target.exists()
    subprocess.run([*cmd, "0", str(REPO)], check=True, timeout=60)
    assert [p.name for p in target.parent.iterdir()] == ["merged"]
    assert (target / "weights.bin").stat().st_size == 1_000_000


def test_umask_is_read_once_without_changing_it():
    now = os.umask(0o022)
    os.umask(now)
    assert now == files._UMASK
