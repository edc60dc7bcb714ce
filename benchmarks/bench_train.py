"""Training throughput, side by side in one run: plain TRL SFTTrainer vs snaketune's train path.

Same model (the embedded SmolLM2-135M), same formatted sample examples in the same number,
same LoRA (r, alpha, target modules), same batch size, max length, learning rate and steps.
Baseline: `SFTTrainer` with TRL's defaults for everything else (gradient checkpointing on, no
packing, full-vocabulary logits; bf16 autocast is TRL's default and is kept where this
hardware's bf16 matmul is fast, otherwise fp32). Candidate: snaketune's `build_trainer`,
exactly as the `train` rule builds it from config.yaml.

Two dtype policies, each side named with it in the output:
- like with like (the `speedup:` line, what the train-speed check reads): each side with its own
  defaults on this machine. snaketune with the schema's (config.yaml without the demo's fp32
  pin, `training.bf16` and `fast_path.bf16_frozen_weights`: bf16 frozen weights where bf16 is
  fast), TRL with its own (bf16 autocast where bf16 is fast);
- the demo's fp32 pin (`fp32 pin:` line): snaketune exactly as config.yaml pins it vs TRL in fp32.
Where bf16 is slow both policies are fp32 and only the first pair runs. On CPU a further side,
snaketune in TRL's batch order (length grouping off), takes TRL's very batches, so the losses
compare step by step (`loss at the same step` line, beside TRL's own bf16-vs-fp32 gap there).

Each side runs in its own process (peak RSS is per process). Warm-up steps are excluded from
tokens/s. MFU = 4 * N * tokens/s / peak, with N the parameters on the gradient path (every
weight except the input embedding; the tied LM head counted once): 2N FLOPs forward and 2N
backward through frozen weights per token (LoRA's own FLOPs and attention are ignored).

Needs `snakemake --cores 2 format_dataset`. Usage: python benchmarks/bench_train.py [--steps 20]

On a GPU: `--device cuda --model-config smollm2-135m` (or gemma3-270m) trains a randomly
initialised model of that real shape (benchmarks/configs/, see benchmarks/synthetic.py) on the
sample formatted through the workflow's own data stages, so neither the embedded model nor
`format_dataset` is needed. With CUDA a third side runs, `liger`: snaketune's trainer with TRL's
`use_liger_kernel=True` (Liger's Triton RMSNorm/RoPE/SwiGLU kernels; TRL's chunked LM head)
instead of labels-only logits, and a fourth, `snaketune, + liger kernels` (both). `--json`
writes the summary for tests/gpu/run_gpu_checks.sh.
"""

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from machine import cpu_model  # noqa: E402  (benchmarks/ is on the path when run as a script)


def matmul_peak(dtype_name: str, threads: int, device: str = "cpu") -> float:
    import torch

    if device == "cuda":  # 8192^3 products, the size the device notes quote (~800 TFLOP/s bf16 on H100)
        dtype = getattr(torch, dtype_name)
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        return 2 * 8192**3 * 10 / (time.perf_counter() - t)
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    for _ in range(2):
        a @ b
    n = 10 if dtype == torch.float32 else 2
    t = time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - t)


def step_timer(counter, device: str = "cpu"):
    """Callback: time and real tokens of each optimizer step (tokens from the collator's counter)."""
    import torch
    from transformers import TrainerCallback

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps = []  # (seconds, tokens, loss)
            self.t = None
            self.tokens = 0

        def on_step_begin(self, args, state, control, **kw):
            if self.t is None:
                sync()
                self.t, self.tokens = time.perf_counter(), counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            now, tok = time.perf_counter(), counter()
            self.steps.append([now - self.t, tok - self.tokens, None])
            self.t, self.tokens = now, tok

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and self.steps:
                self.steps[-1][2] = float(logs["loss"])

    return StepTimer()


ABLATIONS = {
    "no labels-only logits": {"fast_path": {"labels_only_logits": False}},
    "no length grouping": {"fast_path": {"group_by_length": False}},
    "packing on": {"fast_path": {"packing": True}},
    "gradient checkpointing on": {"gradient_checkpointing": True},
    # the bf16 compute of the trainable path (nothing changes where bf16 is slow: fp32 throughout)
    "no bf16 LoRA compute": {"fast_path": {"bf16_lora_compute": False}},
    "no eager small attention": {"fast_path": {"eager_small_attention": False}},
    # opt-in: compiling costs its first step (printed), then every step is faster
    "torch_compile on": {"torch_compile": True},
}
# The loss check: snaketune (its defaults but TRL's random batch order, i.e. without length
# grouping) takes the same batches as TRL at every step, so their losses compare step by step.
SAME_BATCHES = "snaketune, TRL's batch order"
# The Liger sides (CUDA only: Liger's kernels are Triton). TRL 1.16 applies Liger's layer kernels
# only (RMSNorm, RoPE, SwiGLU/GeGLU) and computes its loss with its own chunked LM head; snaketune's
# labels-only loss calls the decoder and head itself, so the two combine.
LIGER = "liger"  # TRL's use_liger_kernel instead of labels-only logits
LIGER_SIDES = {
    LIGER: ("snaketune", {"use_liger_kernel": True, "fast_path": {"labels_only_logits": False}}),
    "snaketune, + liger kernels": ("snaketune", {"use_liger_kernel": True}),
}
LIGER_ABLATIONS = {"trl + liger kernels": ("trl", {"use_liger_kernel": True})}
# The demo's fp32 pin side by side with TRL in fp32 (where bf16 is fast; else the defaults are fp32).
FP32_TRL, FP32_SNAKETUNE = "trl, fp32", "snaketune, fp32 pin (config.yaml)"


def token_subset(tokens: Path, n: int, out: Path) -> Path:
    """The first ``n`` examples of a token file (format_dataset's), written to ``out``."""
    from workflow_scripts.data.tokens import TokensWriter, open_tokens

    head = open_tokens(tokens)
    head = head.select(range(min(n, len(head))))
    writer = TokensWriter(out)
    writer.write(head["input_ids"][:], head["prompt_length"][:])
    writer.close()
    return out


# The dtype policies a side runs with (see the docstring).
DEFAULTS, FP32 = "defaults", "fp32"


def run_side(
    side: str,
    cfg_path: str,
    steps: int,
    threads: int,
    policy: str,
    override: dict | None = None,
    device: str = "cpu",
    base_dir: str | None = None,
    fmt_dir: str | None = None,
    batch_size: int | None = None,
) -> dict:
    import pandas as pd
    import torch

    from workflow_scripts.config import load_and_resolve, schema_default
    from workflow_scripts.layout import model_dir
    from workflow_scripts.models.loading import bf16_is_fast
    from workflow_scripts.sweeps.points import expand
    from workflow_scripts.training.train import build_trainer

    torch.set_num_threads(threads)
    override = dict(override or {})
    liger = bool(override.get("use_liger_kernel"))
    if side == "trl":
        override.pop("use_liger_kernel", None)
    cfg = load_and_resolve(cfg_path)
    training = {
        **cfg["training"],
        "max_steps": steps,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": ["none"],
        "warmup_steps": 0,
    }
    if batch_size:
        training["per_device_train_batch_size"] = batch_size
    if policy == DEFAULTS:  # the schema's dtype choices: the demo's fp32 pin taken out
        training.pop("bf16", None)
        frozen = schema_default("training.fast_path.bf16_frozen_weights")
        training["fast_path"] = {**training["fast_path"], "bf16_frozen_weights": frozen}
    else:
        training["bf16"] = False
        training["fast_path"] = {**training["fast_path"], "bf16_frozen_weights": False}
    for key, value in override.items():
        training[key] = {**training.get(key, {}), **value} if isinstance(value, dict) else value
    base_dir = base_dir or str(REPO / model_dir(cfg["model"]))
    fmt = Path(fmt_dir) if fmt_dir else REPO / expand(cfg)[0].formatted
    n_examples = steps * training["per_device_train_batch_size"] * training["gradient_accumulation_steps"]
    torch.manual_seed(0)
    if side == "snaketune":
        subset = token_subset(
            fmt / "train.tokens.arrow",
            n_examples,
            Path("/tmp") / f"bench_train_{Path(base_dir).name}_{n_examples}.tokens.arrow",
        )
        trainer, collator, info = build_trainer(
            str(subset),
            str(subset),
            base_dir,
            training,
            cfg["peft"],
            Path("/tmp/bench_ckpt_c"),
            ["none"],
            device,
        )
        timer = step_timer(lambda: collator.real_tokens, device)
        info["use_liger_kernel"] = bool(trainer.args.use_liger_kernel)
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        from workflow_scripts.trainer_fields import lora_kwargs

        frame = pd.read_parquet(fmt / "train.parquet", columns=["messages"]).head(n_examples)
        rows = []
        for messages in frame["messages"]:
            msgs = json.loads(messages)
            rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
        tok = AutoTokenizer.from_pretrained(base_dir)
        # TRL's default is bf16=True: kept only where bf16 is fast here (else TRL would crawl)
        bf16 = policy == DEFAULTS and bf16_is_fast(device)
        args = SFTConfig(
            output_dir="/tmp/bench_ckpt_b",
            max_steps=steps,
            per_device_train_batch_size=training["per_device_train_batch_size"],
            gradient_accumulation_steps=training["gradient_accumulation_steps"],
            learning_rate=training["learning_rate"],
            lr_scheduler_type=training.get("lr_scheduler_type", "linear"),
            max_length=training["max_length"],
            logging_steps=1,
            save_strategy="no",
            report_to=["none"],
            use_cpu=device == "cpu",
            bf16=bf16,
            seed=training["seed"],
            **({"use_liger_kernel": True} if liger else {}),
        )
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            peft_config=LoraConfig(task_type="CAUSAL_LM", **lora_kwargs(cfg["peft"])),
        )
        collate = trainer.data_collator
        seen = {"n": 0}

        def counting(examples):
            batch = collate(examples)
            seen["n"] += (
                int(batch["attention_mask"].sum())
                if "attention_mask" in batch
                else batch["input_ids"].numel()
            )
            return batch

        trainer.data_collator = counting
        timer = step_timer(lambda: seen["n"], device)
        info = {
            "dtype_policy": "bf16 autocast" if bf16 else "fp32",
            "bf16_autocast": bf16,
            "gradient_checkpointing": args.gradient_checkpointing,
        }
        if liger:
            info["use_liger_kernel"] = True
    trainer.add_callback(timer)
    trainer.train()
    model = trainer.model
    n_path = sum(
        p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lora_" not in n
    )
    tied = getattr(model.get_base_model().config, "tie_word_embeddings", False)
    if tied:
        n_path += model.get_base_model().get_output_embeddings().weight.numel()
    result = {
        "steps": timer.steps,
        "info": info,
        "params_on_path": n_path,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def same_batch_losses(results: dict, warmup: int) -> dict | None:
    """snaketune's and TRL's losses at the same steps on the same batches (SAME_BATCHES), printed
    beside TRL's own bf16-vs-fp32 difference there (the noise a dtype policy alone makes)."""
    if SAME_BATCHES not in results:
        return None
    trl, ours = results["trl"]["steps"], results[SAME_BATCHES]["steps"]
    if [s[1] for s in trl] != [s[1] for s in ours]:  # tokens per step differ: not the same batches
        print("loss at the same step: the batches differ from TRL's (tokens per step), no comparison")
        return None

    def gap(other: list) -> float:  # mean |difference| over the measured steps
        steps = zip(trl[warmup:], other[warmup:], strict=True)
        pairs = [(a[2], b[2]) for a, b in steps if a[2] is not None and b[2] is not None]
        return sum(abs(a - b) for a, b in pairs) / len(pairs)

    out = {"last_step": len(trl), "trl": trl[-1][2], "snaketune": ours[-1][2], "mean_abs_gap": gap(ours)}
    line = (
        f"loss at the same step, same batches: step {len(trl)} trl {out['trl']:.4f} vs snaketune "
        f"{out['snaketune']:.4f}; mean |gap| over the measured steps {out['mean_abs_gap']:.4f}"
    )
    fp32 = results.get(FP32_TRL, {}).get("steps")
    if fp32 and [s[1] for s in fp32] == [s[1] for s in trl]:
        out["trl_bf16_vs_fp32_gap"] = gap(fp32)
        line += f" (TRL bf16 vs TRL fp32, the same batches: {out['trl_bf16_vs_fp32_gap']:.4f})"
    print(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="also run snaketune with each speed-up switched off, one at a time",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--model-config",
        help="a randomly initialised model of this shape instead of the embedded model: "
        "smollm2-135m, gemma3-270m (benchmarks/configs/) or a config.json path",
    )
    parser.add_argument("--batch-size", type=int, help="per-device batch size (default: the config's)")
    parser.add_argument(
        "--liger",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the Liger sides (default: with --device cuda)",
    )
    parser.add_argument("--json", help="write the summary to this JSON file")
    parser.add_argument("--side", choices=["trl", "snaketune"], help=argparse.SUPPRESS)
    parser.add_argument("--policy", choices=[DEFAULTS, FP32], default=DEFAULTS, help=argparse.SUPPRESS)
    parser.add_argument("--override", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--base-dir", help=argparse.SUPPRESS)
    parser.add_argument("--fmt-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    total = args.steps + args.warmup
    if args.side:
        result = run_side(
            args.side,
            args.config,
            total,
            args.threads,
            args.policy,
            json.loads(args.override),
            args.device,
            args.base_dir,
            args.fmt_dir,
            args.batch_size,
        )
        Path(args.out).write_text(json.dumps(result))
        return
    cuda = args.device == "cuda"
    liger = cuda if args.liger is None else args.liger
    if cuda:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device")
    base_dir = fmt_dir = None
    if args.model_config:
        import synthetic

        from workflow_scripts.config import load_and_resolve

        base, fmt = synthetic.prepare(args.model_config, load_and_resolve(args.config), args.device)
        base_dir, fmt_dir = str(base), str(fmt)
        print(
            f"model: {json.loads((base / 'manifest.json').read_text())['model_id']} (random weights), {base}"
        )
    peaks = {d: matmul_peak(d, args.threads, args.device) for d in ("float32", "bfloat16")}
    where = f" ({torch.cuda.get_device_name()})" if cuda else f" ({cpu_model()})"
    print(
        f"matmul peak here{where}: fp32 {peaks['float32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s"
    )
    from workflow_scripts.models.loading import bf16_is_fast

    # label -> (side, overrides, dtype policy)
    runs = {"trl": ("trl", {}, DEFAULTS), "snaketune": ("snaketune", {}, DEFAULTS)}
    if not cuda:  # tests/gpu/run_gpu_checks.sh's time limit is sized for the GPU sides below
        runs[SAME_BATCHES] = ("snaketune", {"fast_path": {"group_by_length": False}}, DEFAULTS)
    if bf16_is_fast(args.device):  # else both policies are fp32: the first pair says it all
        runs.update({FP32_TRL: ("trl", {}, FP32), FP32_SNAKETUNE: ("snaketune", {}, FP32)})
    if liger:
        runs.update({k: (*v, DEFAULTS) for k, v in LIGER_SIDES.items()})
    if args.ablations:
        runs.update({f"snaketune, {name}": ("snaketune", ov, DEFAULTS) for name, ov in ABLATIONS.items()})
        if liger:
            runs.update({k: (*v, DEFAULTS) for k, v in LIGER_ABLATIONS.items()})
    results, failed = {}, {}
    for i, (label, (side, override, policy)) in enumerate(runs.items()):
        out = Path("/tmp") / f"bench_train_{i}.json"
        cmd = [sys.executable, __file__, "--side", side, "--out", str(out), "--config", args.config]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        cmd += ["--override", json.dumps(override), "--device", args.device, "--policy", policy]
        if base_dir:
            cmd += ["--base-dir", base_dir, "--fmt-dir", fmt_dir]
        if args.batch_size:
            cmd += ["--batch-size", str(args.batch_size)]
        out.unlink(missing_ok=True)
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not out.is_file():
            # Reported, not fatal: the other sides still give their numbers (trl and snaketune are needed).
            tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-12:]
            print(f"{label}: FAILED (exit {proc.returncode}); last lines of its output:", file=sys.stderr)
            print("\n".join(f"  | {ln}" for ln in tail), file=sys.stderr)
            errors = [ln for ln in tail if re.search(r"(Error|Exception)\b", ln)]
            failed[label] = (errors or tail or [f"exit {proc.returncode}"])[-1].strip()
            if label in ("trl", "snaketune"):
                sys.exit(1)
            continue
        results[label] = json.loads(out.read_text())
    summary = {}
    for side, r in results.items():
        measured = r["steps"][args.warmup :]
        secs = sum(s[0] for s in measured)
        toks = sum(s[1] for s in measured)
        losses = [s[2] for s in measured if s[2] is not None]
        tps = toks / secs
        peak = peaks["float32"] if r["info"]["dtype_policy"] == "fp32" else max(peaks.values())
        mfu = 4 * r["params_on_path"] * tps / peak
        summary[side] = {"tps": tps, "loss": sum(losses) / len(losses), "rss": r["peak_rss_mb"], "mfu": mfu}
        summary[side]["first_step_s"] = r["steps"][0][0]  # compilation, where on, happens here
        memory = f"peak RSS {r['peak_rss_mb']:7.0f} MB"
        if cuda:
            summary[side]["peak_gpu_mb"] = r["peak_gpu_mb"]
            memory = f"peak GPU {r['peak_gpu_mb']:7.0f} MB"
        print(
            f"{side:42s} {tps:8.1f} real tok/s  {toks:6d} tokens in {secs:6.1f} s  {memory}  "
            f"loss {summary[side]['loss']:.4f}  MFU {100 * mfu:.1f}%  first step {summary[side]['first_step_s']:.1f} s  "
            f"({r['info']})"
        )
    for label in summary:
        if label.startswith("snaketune, ") and label not in (FP32_SNAKETUNE, SAME_BATCHES):
            ratio = summary["snaketune"]["tps"] / summary[label]["tps"]
            print(f"snaketune default vs {label[11:]}: {ratio:.2f}x")
    a, b = summary["trl"], summary["snaketune"]
    print(f"MFU formula: 4 * {results['snaketune']['params_on_path']:,} params * tok/s / matmul peak")

    def policy(label: str) -> str:
        return results[label]["info"]["dtype_policy"]

    print(
        f"speedup: {b['tps'] / a['tps']:.2f} like with like, each side's defaults here (trl [{policy('trl')}] "
        f"{a['tps']:.1f} tok/s, snaketune [{policy('snaketune')}] {b['tps']:.1f} tok/s) "
        f"loss: {a['loss']:.4f} vs {b['loss']:.4f}; snaketune MFU {100 * b['mfu']:.1f}%"
    )
    pinned = None
    if FP32_TRL in summary and FP32_SNAKETUNE in summary:
        c, d = summary[FP32_TRL], summary[FP32_SNAKETUNE]
        pinned = {"speedup_vs_trl": d["tps"] / c["tps"], "cost_of_the_pin": b["tps"] / d["tps"]}
        print(
            f"fp32 pin: {pinned['speedup_vs_trl']:.2f} (trl [fp32] {c['tps']:.1f} tok/s, snaketune as config.yaml "
            f"pins it [{policy(FP32_SNAKETUNE)}] {d['tps']:.1f} tok/s) loss: {c['loss']:.4f} vs {d['loss']:.4f}; "
            f"the pin costs snaketune {pinned['cost_of_the_pin']:.2f}x here"
        )
    same_step = same_batch_losses(results, args.warmup)
    decision = None
    if liger and LIGER in summary:
        c = summary[LIGER]
        candidates = {
            k: summary[k]["tps"] for k in ("snaketune", LIGER, "snaketune, + liger kernels") if k in summary
        }
        best = max(candidates, key=candidates.get)
        decision = {
            "labels_only_vs_liger": b["tps"] / c["tps"],
            "fastest": best,
            "setting": {
                "snaketune": "fast_path.labels_only_logits: true (the default)",
                LIGER: "use_liger_kernel: true, fast_path.labels_only_logits: false",
                "snaketune, + liger kernels": "use_liger_kernel: true, fast_path.labels_only_logits: true",
            }[best],
        }
        print(
            f"labels-only vs liger: {decision['labels_only_vs_liger']:.2f} (labels-only {b['tps']:.1f} tok/s, "
            f"liger {c['tps']:.1f} tok/s) fastest: {best} -> {decision['setting']}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": args.device,
                    "gpu": torch.cuda.get_device_name() if cuda else None,
                    "model": args.model_config or "embedded",
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "batch_size": args.batch_size,
                    "matmul_peak_flops": peaks,
                    "sides": {k: {**v, "info": results[k]["info"]} for k, v in summary.items()},
                    "speedup_vs_trl": b["tps"] / a["tps"],  # like with like
                    "fp32_pin": pinned,
                    "same_batch_losses": same_step,
                    "liger": decision,
                    "failed": failed,
                },
                indent=1,
                default=str,
            )
        )
    if failed:
        sys.exit(f"failed sides: {', '.join(failed)}")


if __name__ == "__main__":
    main()
