"""Generation speed, side by side in one run, on the sample's test prompts and on FinQA-length ones.

Two prompt sets: `sample` (the formatted test split, ~150 tokens each) and `long` (the same
prompts lengthened to 400-900 tokens with seeded filing text, benchmarks/long_prompts.py: what
real FinQA prompts cost). On each set, greedy, the same model, dtype and batch size everywhere:

(a) a one-at-a-time `model.generate` loop (what a user's script does; the reference outputs);
(b) plain batched `generate`, left padding, unsorted;
(c) batched `generate` with the static cache (`cache_implementation="static"`);
(d) transformers' continuous batching (`model.generate_batch`, paged attention);
(e) snaketune's evaluation generator (workflow_scripts/evaluation/generate.py) with config.yaml's
    evaluation settings;
(c+) with `--compile` only: (c) with torch.compile (inductor); its first, compiling call is not
    timed. On a 2-core CPU compiling took ~95 s and the compiled runs were no faster, so it is off.

(a) runs once; (b)-(e) run `--repeats` times (default 3), interleaved in a rotating order, and
the best time of each counts, so one noisy moment on a shared machine cannot decide (a side over
1.5x slower than (b) in its first run, such as (d) on a CPU, runs once). `identical`
counts prompts whose output equals (a)'s token for token. Per set it prints
`speedup: X (...) vs_batched_hf: Y identical: A/B`, where Y compares (e), the evaluation's path,
with (b). The dtype is the evaluation's (`evaluation.dtype: auto`: bf16 on CUDA and on CPUs whose
bf16 matmul is measured fast, else fp32), or `--dtype`.

Needs the base model and the formatted test split: `snakemake --cores 2 --until format_dataset`.
Usage: python benchmarks/bench_generate.py [--n 32] [--long-n 16] [--sets sample,long]
       [--repeats 3] [--max-new-tokens N] [--threads 2] [--dtype float32] [--model DIR]
       [--compile] [--json out.json]

On a GPU: `--device cuda --model-config smollm2-135m` (or gemma3-270m) generates with a randomly
initialised model of that real shape (benchmarks/synthetic.py), so no embedded model or
`format_dataset` is needed.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from long_prompts import long_prompts  # noqa: E402
from machine import cpu_model  # noqa: E402

from workflow_scripts.config import load_and_resolve  # noqa: E402
from workflow_scripts.evaluation.generate import GenerationSettings, eos_ids, generate  # noqa: E402
from workflow_scripts.layout import model_dir as base_model_dir  # noqa: E402
from workflow_scripts.models.loading import (  # noqa: E402
    bf16_speed,
    dtype_name,
    load_model,
    load_tokenizer,
    resolve_dtype,
)
from workflow_scripts.sweeps.points import expand  # noqa: E402

# A side more than this many times slower than (b) in its first run is not repeated.
SLOW = 1.5

SIDES = {
    "a": "one-at-a-time HF generate",
    "b": "batched HF generate",
    "c": "HF generate, static cache",
    "c+": "HF generate, static cache, torch.compile",
    "d": "HF continuous batching (generate_batch)",
    "e": "snaketune",
}


def until_stop(row: list[int], stop: set[int]) -> list[int]:
    out = []
    for t in row:
        if t in stop:
            break
        out.append(t)
    return out


def hf_generate(model, tok, prompts, batch_size, max_new, stop, **kwargs) -> list[list[int]]:
    """Generated token ids (EOS and padding dropped) of Hugging Face `generate`."""
    tok.padding_side = "left"
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = tok(
            prompts[start : start + batch_size], add_special_tokens=False, return_tensors="pt", padding=True
        ).to(model.device)
        with torch.inference_mode():
            gen = model.generate(
                **enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id, **kwargs
            )
        out += [until_stop(r, stop) for r in gen[:, enc["input_ids"].shape[1] :].tolist()]
    return out


def hf_continuous(model, tok, prompts, max_new, stop) -> list[list[int]]:
    """transformers' continuous batching manager, in the input order."""
    from transformers import GenerationConfig

    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    config = GenerationConfig(
        max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(stop), pad_token_id=tok.pad_token_id
    )
    results = model.generate_batch(inputs=ids, generation_config=config)
    if len(results) != len(ids):
        raise RuntimeError(f"generate_batch returned {len(results)} of {len(ids)} results")
    return [until_stop(r.generated_tokens, stop) for r in results.values()]


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def run_set(name, prompts, model, tok, settings, repeats, stop, compiled=False) -> dict:
    """Every side on one prompt set; the summary of its best runs."""
    max_new, batch = settings.max_new_tokens, settings.batch_size
    sides = {
        "b": lambda: hf_generate(model, tok, prompts, batch, max_new, stop),
        "c": lambda: hf_generate(model, tok, prompts, batch, max_new, stop, cache_implementation="static"),
        "d": lambda: hf_continuous(model, tok, prompts, max_new, stop),
        "e": lambda: generate(model, tok, prompts, settings, progress=False)["token_ids"],
    }
    if compiled:
        from transformers import CompileConfig

        config = CompileConfig(mode="default")
        config._compile_all_devices = True  # transformers compiles on CUDA only unless told
        sides["c+"] = lambda: hf_generate(
            model, tok, prompts, batch, max_new, stop, cache_implementation="static", compile_config=config
        )
        _, sec = timed(sides["c+"])
        print(f"  (c+) compiling call (not counted): {sec:.1f} s", flush=True)
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    print(
        f"\n[{name}] {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens "
        f"(mean {sum(lengths) / len(lengths):.0f}), max_new_tokens={max_new}, batch_size={batch}",
        flush=True,
    )
    reference, sec_a = timed(lambda: hf_generate(model, tok, prompts, 1, max_new, stop))
    times: dict[str, list[float]] = {"a": [sec_a]}
    tokens = {"a": sum(map(len, reference))}
    identical = {"a": len(prompts)}
    print(f"  (a) {SIDES['a']}: {tokens['a'] / sec_a:7.1f} tok/s {sec_a:7.1f} s", flush=True)
    order = list(sides)
    for r in range(repeats):
        for key in order[r % len(order) :] + order[: r % len(order)]:
            if key != "b" and r > 0 and min(times[key]) > SLOW * min(times["b"]):
                continue  # far behind plain batched generate: no noise can change its rank
            out, sec = timed(sides[key])
            times.setdefault(key, []).append(sec)
            tokens[key] = sum(map(len, out))
            same = sum(x == y for x, y in zip(out, reference, strict=True))
            identical[key] = min(identical.get(key, same), same)
            print(
                f"  run {r + 1} ({key}) {SIDES[key]}: {sec:7.1f} s, identical {same}/{len(prompts)}",
                flush=True,
            )
    best = {k: min(v) for k, v in times.items()}
    print(f"  best of up to {repeats} runs (one for (a)):")
    for key in times:
        print(
            f"  ({key}) {SIDES[key]:42s} {tokens[key] / best[key]:7.1f} tok/s {best[key]:7.1f} s  "
            f"identical {identical[key]}/{len(prompts)}  runs {', '.join(f'{t:.1f}' for t in times[key])}"
        )
    fastest_lib = min((k for k in times if k not in ("a", "e")), key=lambda k: best[k])
    print(
        f"  fastest library side: ({fastest_lib}) {SIDES[fastest_lib]}; snaketune vs it: {best[fastest_lib] / best['e']:.2f}"
    )
    summary = (
        f"speedup: {best['a'] / best['e']:.2f} (one-at-a-time {best['a']:.1f} s, snaketune {best['e']:.1f} s) "
        f"vs_batched_hf: {best['b'] / best['e']:.2f} identical: {identical['e']}/{len(prompts)}"
    )
    print(f"[{name}] {summary}", flush=True)
    return {
        "prompts": len(prompts),
        "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)},
        "seconds": times,
        "best_seconds": best,
        "tokens_per_s": {k: tokens[k] / best[k] for k in times},
        "identical": {k: [identical[k], len(prompts)] for k in times},
        "speedup": best["a"] / best["e"],
        "vs_batched_hf": best["b"] / best["e"],
        "vs_fastest_library": best[fastest_lib] / best["e"],
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="sample prompts")
    parser.add_argument("--long-n", type=int, default=16, help="long prompts (each ~400-900 tokens)")
    parser.add_argument("--sets", default="sample,long")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--model-config",
        help="a randomly initialised model of this shape instead of the embedded model: "
        "smollm2-135m, gemma3-270m (benchmarks/configs/) or a config.json path",
    )
    parser.add_argument(
        "--model",
        help="a model folder to generate with instead of the base model, e.g. the demo's fine-tuned "
        "results/default/deployment_model (its answers stop early, where dropping finished rows counts)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add side (c+): (c) with torch.compile (inductor); its first, compiling call is not timed",
    )
    parser.add_argument("--json", help="write the summary to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    cfg = load_and_resolve(args.config)
    ev = cfg["evaluation"]
    if args.model_config:
        import synthetic

        model_dir, fmt = synthetic.prepare(args.model_config, cfg, args.device)
        test = fmt / "test.parquet"
        print(f"model: {json.loads((model_dir / 'manifest.json').read_text())['model_id']} (random weights)")
    else:
        model_dir = Path(args.model) if args.model else REPO / base_model_dir(cfg["model"])
        test = REPO / expand(cfg)[0].formatted / "test.parquet"
    if args.model and not model_dir.is_dir():
        sys.exit(f"--model: {model_dir} is not a model folder")
    if not model_dir.is_dir() or not test.is_file():
        missing = test if model_dir.is_dir() else model_dir
        sys.exit(f"{missing} is missing: run `snakemake --cores 2 --until format_dataset` first")
    sets = args.sets.split(",")
    unknown = set(sets) - {"sample", "long"}
    if unknown:
        sys.exit(f"--sets: unknown prompt set(s) {sorted(unknown)}; choose from sample, long")
    fast16, sec16, sec32 = bf16_speed(args.device)
    where = torch.cuda.get_device_name() if cuda else f"{cpu_model()}, {args.threads} threads"
    speed = "" if cuda else f" (512x512 matmul: bf16 {sec16 * 1e3:.2f} ms, fp32 {sec32 * 1e3:.2f} ms)"
    print(f"device: {where}; bf16 fast: {'yes' if fast16 else 'no'}{speed}")
    dtype = resolve_dtype(args.dtype or ev["dtype"], args.device)
    model = load_model(model_dir, dtype=dtype, device=args.device if cuda else None)
    tok = load_tokenizer(model_dir)
    stop = set(eos_ids(model, tok))
    settings = GenerationSettings.from_config(
        {**ev, "max_new_tokens": args.max_new_tokens or ev["max_new_tokens"]}
    )
    print(f"dtype: {dtype_name(dtype)} (every side); model: {model_dir.name}")
    all_prompts = pd.read_parquet(test)["prompt_text"].tolist()
    results = {}
    for name in sets:
        if name == "sample":
            prompts = all_prompts[: args.n]
        else:
            prompts = long_prompts(all_prompts[: args.long_n], tok)
        results[name] = run_set(name, prompts, model, tok, settings, args.repeats, stop, args.compile)
    print()
    for name in sets:
        print(f"{name}: {results[name]['summary']}")
    if args.json:
        summary = {
            "device": where,
            "bf16_fast": fast16,
            "model": args.model_config or args.model or "embedded base model",
            "dtype": str(dtype),
            "max_new_tokens": settings.max_new_tokens,
            "batch_size": settings.batch_size,
            "repeats": args.repeats,
            "sides": SIDES,
            "sets": results,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        }
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
