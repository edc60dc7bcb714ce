"""The GPU machine as the checks found it: the device, and every dependency's version against
pyproject.toml's range (and where it came from: the machine's image or .whl/).

    python tests/gpu/env_check.py --out results/gpu_checks/env.json
"""

import argparse
import json
import platform
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wheels import EXTRA_REQUIREMENTS, LEFT_OUT, norm  # noqa: E402


def packages() -> list[dict]:
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    rows = []
    for spec in [*project["dependencies"], *EXTRA_REQUIREMENTS, "timm", "torchvision", "triton"]:
        req = Requirement(spec)
        try:
            dist = metadata.distribution(req.name)
            version = dist.version
            where = str(dist.locate_file(""))
        except metadata.PackageNotFoundError:
            version, where = None, None
        row = {
            "name": req.name,
            "wanted": str(req.specifier) or "any",
            "version": version,
            "in_range": version is not None and req.specifier.contains(version, prereleases=True),
            "from": where,
        }
        if version is None and norm(req.name) in LEFT_OUT:  # not needed by the checks (wheels.py)
            row |= {"in_range": True, "from": f"left out: {LEFT_OUT[norm(req.name)]}"}
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": torch.cuda.get_device_name(0),
            "gpu_memory_mb": round(props.total_memory / 2**20),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "multiprocessors": props.multi_processor_count,
            "bf16": torch.cuda.is_bf16_supported(),
        }
    info["packages"] = packages()
    bad = [p for p in info["packages"] if not p["in_range"]]
    info["out_of_range"] = [f"{p['name']} {p['version']} (wanted {p['wanted']})" for p in bad]
    Path(args.out).write_text(json.dumps(info, indent=1))
    print(json.dumps({k: v for k, v in info.items() if k != "packages"}, indent=1))
    for p in info["packages"]:
        short = re.sub(r"/(lib/python[^/]+/)?(site|dist)-packages/?$", "", p["from"] or "-")
        print(f"  {p['name']:32s} {p['version'] or 'MISSING':14s} {p['wanted']:18s} {short}")
    if bad:
        sys.exit(f"out of pyproject.toml's range: {info['out_of_range']}")


if __name__ == "__main__":
    main()
