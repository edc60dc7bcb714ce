"""Which wheels the GPU machine lacks, fetched for Python 3.12 manylinux x86_64 (no network there).

The GPU machine's image (tests/gpu/gpu_image.txt) already holds PyTorch, transformers, accelerate,
timm, torchvision and ~200 more packages. This script resolves the project's dependencies
(pyproject.toml) plus the GPU checks' own (liger-kernel) *as if* those packages were installed:
a throw-away virtual environment gets a stub distribution (name and version, no code, no
dependencies) for each image package, and pip's resolver is asked, dry-run, what it would add.
What it would add is exactly what is missing there, including an image package whose version
is outside pyproject.toml's range (transformers 5.17 there, >=5.23 wanted). Packages whose
version there is unknown are stubbed at the version the resolver picks for them, so their own
dependencies are not fetched either.

    python tests/gpu/wheels.py plan  --out .whl/plan.json
    python tests/gpu/wheels.py fetch --plan .whl/plan.json --dest .whl
    python tests/gpu/wheels.py check --dest .whl          # closure and tags, offline

fetch_wheels.sh runs the three. Standard library only (plus `packaging` for `check`).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
IMAGE_FILE = HERE / "gpu_image.txt"
# Needed by the GPU checks but not by the project: the Liger side of bench_train.py.
EXTRA_REQUIREMENTS = ["liger-kernel>=0.8,<0.9"]
# Project dependencies the GPU checks never import, left out so that the wheels and the working
# tree stay under the device's 64 MiB: with them the wheels alone come to ~65 MB.
LEFT_OUT = {
    "wandb": "20 MB wheel; the GPU checks run with W&B disabled",
    "snakemake-executor-plugin-slurm": "SLURM submission only; the checks call the stages directly",
}
PYTHON_VERSION = "3.12"
# manylinux2014 == manylinux_2_17; newer glibc tags are listed because some wheels (rpds-py,
# pyarrow, ...) are only published for them. The GPU image is glibc >= 2.35 (Python 3.12.3).
PLATFORMS = [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    *(f"manylinux_2_{n}_x86_64" for n in (5, 12, 17, 24, 26, 27, 28, 31, 34, 35)),
]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_image() -> tuple[dict[str, str | None], set[str]]:
    """{normalised name: version or None} of the GPU image, and the names to carry anyway."""
    versions: dict[str, str | None] = {}
    carry: set[str] = set()
    for raw in IMAGE_FILE.read_text().splitlines():
        line, _, comment = raw.partition("#")
        line = line.strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        versions[norm(name)] = version.strip() or None
        if comment.strip().startswith("carry"):
            carry.add(norm(name))
    return versions, carry


def requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [
        r for r in project["dependencies"] if norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) not in LEFT_OUT
    ]
    return [*wanted, *EXTRA_REQUIREMENTS]


def python312() -> str | None:
    """A working CPython 3.12 here (the resolver must see the GPU machine's Python)."""
    import glob

    cands = [os.environ.get("PYTHON312", ""), shutil.which("python3.12") or ""]
    cands += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3")))
    cands += sorted(glob.glob("/root/.pyenv/versions/3.12*/bin/python3"))
    for cand in filter(None, cands):
        probe = subprocess.run(
            [cand, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"], capture_output=True, text=True
        )
        if probe.stdout.strip() == "True":
            return cand
    return None


def make_stub_env(root: Path, stubs: dict[str, str]) -> Path:
    """A venv with a metadata-only distribution for each stub; returns its python."""
    py = python312()
    if py is None:
        sys.exit("wheels.py: needs a CPython 3.12 here (set PYTHON312=/path/to/python3.12)")
    subprocess.run([py, "-m", "venv", "--without-pip", str(root)], check=True)
    subprocess.run(  # pip itself, from the interpreter that made the venv (no network needed)
        [str(root / "bin" / "python"), "-m", "ensurepip", "--default-pip"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    site = next((root / "lib").glob("python3.*/site-packages"))
    for name, version in stubs.items():
        if name in ("pip", "setuptools", "wheel"):
            continue  # the venv's own pip must keep working
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("stub\n")
        (info / "RECORD").write_text("")
    return root / "bin" / "python"


def dry_run(python: Path, reqs: list[str], report: Path) -> list[dict]:
    """What pip would install into this environment: [{name, version, url, sdist}]."""
    cmd = [str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report)]
    cmd += ["--prefer-binary", "--disable-pip-version-check", *reqs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("WARNING: Location")]
        sys.exit("wheels.py: pip could not resolve:\n" + "\n".join(errors[-20:]))
    items = []
    for item in json.loads(report.read_text())["install"]:
        url = item["download_info"]["url"]
        items.append(
            {
                "name": norm(item["metadata"]["name"]),
                "version": item["metadata"]["version"],
                "file": url.rsplit("/", 1)[-1],
                "sdist": not url.endswith(".whl"),
            }
        )
    return sorted(items, key=lambda x: x["name"])


def plan(out: Path) -> dict:
    image, carry = read_image()
    known = {n: v for n, v in image.items() if v and n not in carry}
    reqs = requirements()
    with tempfile.TemporaryDirectory() as tmp:
        # Pass 1: stub what we know the versions of; learn versions for the names we only know.
        first = dry_run(make_stub_env(Path(tmp) / "env1", known), reqs, Path(tmp) / "r1.json")
        assumed = {i["name"]: i["version"] for i in first if i["name"] in image and i["name"] not in known}
        assumed = {n: v for n, v in assumed.items() if n not in carry}
        # Pass 2: every image package stubbed; what remains is missing there.
        second = dry_run(make_stub_env(Path(tmp) / "env2", {**known, **assumed}), reqs, Path(tmp) / "r2.json")
    for item in second:
        have = image.get(item["name"], "absent")
        if item["name"] in carry:
            item["why"] = "carried: version there unknown, pyproject pins it narrowly"
        elif have == "absent":
            item["why"] = "not on the GPU image"
        else:
            item["why"] = f"GPU image has {have}, outside pyproject.toml's range"
    result = {
        "python": PYTHON_VERSION,
        "requirements": reqs,
        "left_out": LEFT_OUT,
        "assumed_image_versions": assumed,
        "fetch": second,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def fetch(plan_file: Path, dest: Path) -> None:
    items = json.loads(plan_file.read_text())["fetch"]
    wheels = [f"{i['name']}=={i['version']}" for i in items if not i["sdist"]]
    sdists = [f"{i['name']}=={i['version']}" for i in items if i["sdist"]]
    base = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    if wheels:
        cmd = [*base, "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
        cmd += ["--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", "cp312"]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        subprocess.run(cmd + wheels, check=True)
    if sdists:  # e.g. rouge-score 0.1.2 is published as an sdist only: build its (pure) wheel here
        subprocess.run([*base, "wheel", "--no-deps", "-w", str(dest), *sdists], check=True)


def wheel_requires(path: Path) -> tuple[str, str, list[str]]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    fields = {}
    reqs = []
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(": ")
        if key == "Requires-Dist":
            reqs.append(value)
        elif key in ("Name", "Version"):
            fields[key] = value
    return norm(fields["Name"]), fields["Version"], reqs


def check(dest: Path) -> dict:
    """Every fetched wheel installs on CPython 3.12 manylinux x86_64, one version per name, and
    every requirement of every wheel is met by the wheels or the image (versions where known)."""
    from packaging.requirements import Requirement
    from packaging.tags import Tag
    from packaging.utils import parse_wheel_filename

    image, _ = read_image()
    ok_tags = {Tag("py3", "none", "any"), Tag("py312", "none", "any")}
    for interp in ("cp312", "py3", "py312"):
        for abi in ("cp312", "abi3", "none"):
            ok_tags |= {Tag(interp, abi, p) for p in PLATFORMS + ["any"]}
    ok_tags |= {Tag(f"cp3{m}", "abi3", p) for m in range(2, 13) for p in PLATFORMS}
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux"}
    env |= {"platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}
    env |= {"implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    fetched: dict[str, str] = {}
    problems = []
    files = sorted(dest.glob("*.whl"))
    for f in files:
        name, version, tags = parse_wheel_filename(f.name)[0], str(parse_wheel_filename(f.name)[1]), None
        tags = parse_wheel_filename(f.name)[3]
        if not tags & ok_tags:
            problems.append(f"{f.name}: not installable on CPython 3.12 manylinux x86_64")
        if norm(name) in fetched:
            problems.append(f"{name}: two versions ({fetched[norm(name)]}, {version})")
        fetched[norm(name)] = version
    for f in files:
        name, _, reqs = wheel_requires(f)
        for spec in reqs:
            req = Requirement(spec)
            if req.marker and not req.marker.evaluate(env):
                continue
            dep = norm(req.name)
            version = fetched.get(dep) or image.get(dep)
            if dep not in fetched and dep not in image:
                problems.append(f"{name} needs {spec}: neither fetched nor on the image")
            elif version and not req.specifier.contains(version, prereleases=True):
                where = "fetched" if dep in fetched else "on the image"
                problems.append(f"{name} needs {spec}: {version} {where}")
    size = sum(f.stat().st_size for f in files)
    return {"wheels": len(files), "bytes": size, "problems": problems}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("plan").add_argument("--out", type=Path, required=True)
    p = sub.add_parser("fetch")
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--dest", type=Path, required=True)
    sub.add_parser("check").add_argument("--dest", type=Path, required=True)
    args = parser.parse_args()
    if args.cmd == "plan":
        result = plan(args.out)
        for i in result["fetch"]:
            print(
                f"  {i['name']}=={i['version']}{' (sdist: built here)' if i['sdist'] else ''}  - {i['why']}"
            )
    elif args.cmd == "fetch":
        fetch(args.plan, args.dest)
    else:
        result = check(args.dest)
        print(f"{result['wheels']} wheels, {result['bytes'] / 2**20:.1f} MiB")
        for p in result["problems"]:
            print(f"  problem: {p}")
        if result["problems"]:
            sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    main()
