"""One JSON of the GPU checks' results, and a printed summary; exit 1 when anything failed.

    python tests/gpu/summarize.py --dir results/gpu_checks [--seconds N]

Reads what run_gpu_checks.sh left in DIR: steps.jsonl (each step's exit code and time),
env.json (env_check.py), tests.xml (pytest's JUnit XML, with each test's recorded properties)
and bench_*.json (the benchmarks' --json). Writes DIR/gpu_checks.json.
"""

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def read_tests(xml_file: Path) -> list[dict]:
    if not xml_file.is_file():
        return []
    tests = []
    for case in ET.parse(xml_file).getroot().iter("testcase"):
        outcome = "passed"
        message = None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "")[:500]
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests.append(
            {
                "name": case.get("name"),
                "outcome": outcome,
                "seconds": round(float(case.get("time") or 0), 1),
                "properties": props,
                "message": message,
            }
        )
    return tests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--seconds", type=int)
    args = parser.parse_args()
    d = args.dir
    lines = (d / "steps.jsonl").read_text().splitlines() if (d / "steps.jsonl").is_file() else []
    steps = [json.loads(line) for line in lines if line.strip()]
    env = read_json(d / "env.json") or {}
    tests = read_tests(d / "tests.xml")
    train = {p.stem.removeprefix("bench_train_"): read_json(p) for p in sorted(d.glob("bench_train_*.json"))}
    gen = {
        p.stem.removeprefix("bench_generate_"): read_json(p) for p in sorted(d.glob("bench_generate_*.json"))
    }

    peaks = [float(t["properties"]["peak_gpu_mb"]) for t in tests if "peak_gpu_mb" in t["properties"]]
    for t in tests:
        if "train_peak_memory_mb" in t["properties"]:
            peaks.append(float(t["properties"]["train_peak_memory_mb"]))
    for b in train.values():
        peaks += [s["peak_gpu_mb"] for s in b["sides"].values() if s.get("peak_gpu_mb")]
    peaks += [b["peak_gpu_mb"] for b in gen.values() if b.get("peak_gpu_mb")]

    benchmarks = {"train": {}, "generate": {}}
    for model, b in train.items():
        benchmarks["train"][model] = {
            "tokens_per_s": {k: round(v["tps"], 1) for k, v in b["sides"].items()},
            "mfu": {k: round(v["mfu"], 4) for k, v in b["sides"].items()},
            "peak_gpu_mb": {k: round(v.get("peak_gpu_mb") or 0) for k, v in b["sides"].items()},
            "mean_loss": {k: round(v["loss"], 4) for k, v in b["sides"].items()},
            "speedup_vs_trl": round(b["speedup_vs_trl"], 3),
            "liger": b.get("liger"),
            "batch_size": b.get("batch_size"),
            "steps": b.get("steps"),
            "failed_sides": b.get("failed") or {},
        }
    for model, b in gen.items():
        for name, r in b["sets"].items():  # prompt sets: sample, long
            benchmarks["generate"][f"{model} {name}"] = {
                "tokens_per_s": {k: round(v, 1) for k, v in r["tokens_per_s"].items()},
                "speedup": round(r["speedup"], 3),
                "vs_batched_hf": round(r["vs_batched_hf"], 3),
                "vs_fastest_library": round(r["vs_fastest_library"], 3),
                "identical": r["identical"]["e"],
                "peak_gpu_mb": round(b.get("peak_gpu_mb") or 0),
                "dtype": b.get("dtype"),
            }
    failed_steps = [s["name"] for s in steps if s.get("rc") not in (0, None)]
    skipped_steps = [s["name"] for s in steps if s.get("skipped")]
    failed_tests = [t["name"] for t in tests if t["outcome"] in ("failed", "error")]
    if not tests:
        failed_tests.append("no test results (tests.xml missing)")
    result = {
        "gpu": env.get("gpu"),
        "gpu_memory_mb": env.get("gpu_memory_mb"),
        "versions": {
            "python": env.get("python"),
            "torch": env.get("torch"),
            "cuda": env.get("cuda"),
            **{p["name"]: p["version"] for p in env.get("packages", [])},
        },
        "out_of_range": env.get("out_of_range"),
        "tests": tests,
        "benchmarks": benchmarks,
        "peak_gpu_mb": round(max(peaks)) if peaks else None,
        "steps": steps,
        "seconds": args.seconds,
        "passed": not failed_steps and not failed_tests,
    }
    (d / "gpu_checks.json").write_text(json.dumps(result, indent=1))

    v = result["versions"]
    print(
        f"\nGPU checks on {result['gpu']} (torch {v['torch']}, CUDA {v['cuda']}, transformers "
        f"{v.get('transformers')}, trl {v.get('trl')}, peft {v.get('peft')}, liger-kernel {v.get('liger-kernel')})"
    )
    if result["out_of_range"]:
        print(f"  out of pyproject.toml's range: {', '.join(result['out_of_range'])}")
    n = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")}
    print(f"tests: {n['passed']} passed, {n['failed'] + n['error']} failed, {n['skipped']} skipped")
    for t in tests:
        props = ", ".join(f"{k} {val}" for k, val in t["properties"].items())
        print(f"  {t['outcome'].upper():7s} {t['name']} ({t['seconds']} s) {props}")
        if t["message"]:
            print(f"          {t['message'][:300]}")
    for model, b in benchmarks["train"].items():
        tps = ", ".join(f"{k} {val:.0f}" for k, val in b["tokens_per_s"].items())
        print(f"bench_train {model}: speedup vs trl {b['speedup_vs_trl']:.2f}x; tok/s: {tps}")
        for side, error in b["failed_sides"].items():
            print(f"  FAILED side {side}: {error[:200]}")
        if b["liger"]:
            print(
                f"  labels-only vs liger {b['liger']['labels_only_vs_liger']:.2f}x; fastest: "
                f"{b['liger']['fastest']} ({b['liger']['setting']})"
            )
    for model, b in benchmarks["generate"].items():
        print(
            f"bench_generate {model}: speedup {b['speedup']:.2f}x, vs batched HF {b['vs_batched_hf']:.2f}x, "
            f"vs fastest library side {b['vs_fastest_library']:.2f}x, identical {b['identical'][0]}/"
            f"{b['identical'][1]}, snaketune {b['tokens_per_s']['e']:.0f} tok/s"
        )
    print(f"peak GPU memory: {result['peak_gpu_mb']} MB; wall time {args.seconds} s")
    if skipped_steps:
        print(f"skipped (time budget): {', '.join(skipped_steps)}")
    if failed_steps or failed_tests:
        print(f"FAILED: {', '.join(failed_steps + failed_tests)}")
    print(f"wrote {d / 'gpu_checks.json'}")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
