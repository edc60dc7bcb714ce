"""Generation speed, side by side in one run, on the embedded model and 32 sample test prompts.

(a) a plain one-at-a-time `model.generate` loop in fp32 (what a user's script does);
(b) plain Hugging Face batched `generate`, left padding, snaketune's batch size, unsorted, fp32;
(c) snaketune's generator with the evaluation defaults of config.yaml.
`identical` compares (c) with snaketune's own one-prompt-at-a-time outputs (same model, dtype).

Needs the base model and the formatted test split: `snakemake --cores 2 --until format_dataset` first.
Usage: python benchmarks/bench_generate.py [--n 32] [--max-new-tokens N] [--threads 2]

On a GPU: `--device cuda --model-config smollm2-135m` (or gemma3-270m) generates with a randomly
initialised model of that real shape (benchmarks/synthetic.py), so no embedded model or
`format_dataset` is needed. On CUDA all three runs use the evaluation's dtype (bf16), like with
like; on the CPU (a) and (b) stay fp32 as before. `--json` writes the summary.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from workflow_scripts.config import load_and_resolve  # noqa: E402
from workflow_scripts.config import model_dir as base_model_dir  # noqa: E402
from workflow_scripts.evaluation.generate import GenerationSettings, eos_ids, generate  # noqa: E402
from workflow_scripts.experiments import expand  # noqa: E402
from workflow_scripts.models.loading import load_model, load_tokenizer, resolve_dtype  # noqa: E402


def hf_tokens(model, tok, prompts, batch_size, max_new_tokens, stop):
    """Generated token ids (EOS and padding dropped) of plain HF generate."""
    tok.padding_side = "left"
    out_ids, n_tokens = [], 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        enc = tok(batch, add_special_tokens=False, return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            ids = []
            for t in row:
                if t in stop:
                    break
                ids.append(t)
            out_ids.append(ids)
            n_tokens += len(ids)
    return out_ids, n_tokens


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--model-config",
        help="a randomly initialised model of this shape instead of the embedded model: "
        "smollm2-135m, gemma3-270m (benchmarks/configs/) or a config.json path",
    )
    parser.add_argument("--json", help="write the summary to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
        model_dir = REPO / base_model_dir(cfg["model"])
        test = REPO / expand(cfg)[0].formatted / "test.parquet"
    if not model_dir.is_dir() or not test.is_file():
        sys.exit(
            "run `snakemake --cores 2 --until format_dataset` first (needs the base model and formatted test split)"
        )
    prompts = pd.read_parquet(test)["prompt_text"].tolist()[: args.n]
    max_new = args.max_new_tokens or ev["max_new_tokens"]
    batch = ev["batch_size"]
    tok = load_tokenizer(model_dir)
    dtype = resolve_dtype(ev.get("dtype", "auto"))
    # The baselines: fp32 on the CPU (what a user's script does there), the evaluation's dtype on a GPU.
    base_dtype = dtype if cuda else torch.float32
    device = args.device if cuda else None
    fp32 = load_model(model_dir, dtype=base_dtype, device=device)
    stop = set(eos_ids(fp32, tok))
    where = f", {torch.cuda.get_device_name()}" if cuda else ""
    print(
        f"{len(prompts)} prompts, max_new_tokens={max_new}, batch_size={batch}, threads={args.threads}{where}"
    )
    name = str(base_dtype).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16")

    (_, tok_a), sec_a = timed(lambda: hf_tokens(fp32, tok, prompts, 1, max_new, stop))
    print(f"(a) one-at-a-time HF generate {name}: {tok_a / sec_a:8.1f} tok/s  {sec_a:7.1f} s")
    (_, tok_b), sec_b = timed(lambda: hf_tokens(fp32, tok, prompts, batch, max_new, stop))
    print(f"(b) batched HF generate {name} (bs {batch}): {tok_b / sec_b:8.1f} tok/s  {sec_b:7.1f} s")

    model = fp32 if dtype == base_dtype else load_model(model_dir, dtype=dtype, device=device)
    settings = GenerationSettings.from_config({**ev, "max_new_tokens": max_new})
    res_c = generate(model, tok, prompts, settings, progress=False)
    sec_c = res_c["seconds"]
    print(
        f"(c) snaketune ({str(dtype).replace('torch.', '')}, bs {batch}): {res_c['tokens_per_s']:8.1f} tok/s  {sec_c:7.1f} s"
    )
    single = generate(
        model,
        tok,
        prompts,
        GenerationSettings.from_config({**ev, "max_new_tokens": max_new, "batch_size": 1}),
        False,
    )
    identical = sum(a == b for a, b in zip(res_c["token_ids"], single["token_ids"], strict=True))
    print(f"    snaketune one-at-a-time: {single['tokens_per_s']:8.1f} tok/s (for the identity check)")
    print(
        f"speedup: {sec_a / sec_c:.2f} (one-at-a-time {sec_a:.1f} s, snaketune {sec_c:.1f} s) "
        f"vs_batched_hf: {sec_b / sec_c:.2f} identical: {identical}/{len(prompts)}"
    )
    if args.json:
        summary = {
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "model": args.model_config or "embedded",
            "prompts": len(prompts),
            "max_new_tokens": max_new,
            "batch_size": batch,
            "dtype": {"baselines": str(base_dtype), "snaketune": str(dtype)},
            "tokens_per_s": {
                "one_at_a_time_hf": tok_a / sec_a,
                "batched_hf": tok_b / sec_b,
                "snaketune": res_c["tokens_per_s"],
            },
            "seconds": {"one_at_a_time_hf": sec_a, "batched_hf": sec_b, "snaketune": sec_c},
            "speedup": sec_a / sec_c,
            "vs_batched_hf": sec_b / sec_c,
            "identical": [identical, len(prompts)],
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        }
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
