"""Stages general_base / general_finetuned: general ability of one model, measured per item.

Set-up: the items (workflow_scripts.evaluation.general_items: the `pydoc_data` passages and the
lm-eval tasks, loaded before the model so a broken task file fails first). Work: the text loss
of each passage, batched; lm-eval's `simple_evaluate` on the tasks with `log_samples`, so every
item's result is kept. Save: `general_ability.json` (mean per measure, settings, versions,
timings) and `general_items.jsonl` (one row per item and measure: what `compare` pairs).

Base and fine-tuned run this same code with the same settings, so they see exactly the same
items: the passages are a fixed selection, lm-eval's `limit` takes each task's first items.
"""

import contextlib
import logging
import math
import time
from pathlib import Path

from workflow_scripts.errors import ConfigError
from workflow_scripts.evaluation import general_items
from workflow_scripts.files import write_json, write_jsonl
from workflow_scripts.stage import Job, StageError, set_threads, snakemake_main

log = logging.getLogger("snaketune.general_ability")

TEXT_LOSS = "text_loss"


def text_losses(
    model, tok, passages: list[dict], max_tokens: int, batch_size: int, device: str
) -> list[dict]:
    """Mean next-token NLL (nats/token) of each passage's first ``max_tokens`` tokens, in batches
    of similar length (right-padded: padding after a token never changes what it sees)."""
    import torch
    import torch.nn.functional as F

    encoded = [tok(p["text"], truncation=True, max_length=max_tokens)["input_ids"] for p in passages]
    order = sorted(range(len(passages)), key=lambda i: len(encoded[i]))
    values: list[float] = [math.nan] * len(passages)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
            scored = mask[:, 1:].float()
            per = (nll * scored).sum(1) / scored.sum(1)
            for row, i in enumerate(batch):
                values[i] = float(per[row])
    return [
        {"measure": TEXT_LOSS, "item": p["item"], "hash": p["hash"], "value": v, "tokens": len(e)}
        for p, v, e in zip(passages, values, encoded, strict=True)
    ]


def load_tasks(specs: list[str]) -> tuple[dict, dict[str, str]]:
    """(task name -> lm-eval Task, task name -> the spec it came from) of ``general_ability.tasks``.
    A local task is built inside its folder, so its relative data_files are read from there; a spec
    that yields no task is an error, never an empty measure."""
    tasks, sources = {}, {}
    for spec in specs:
        try:
            if general_items.is_local_task(spec):
                general_items.check_local_task(spec)  # a broken YAML or data file: one line naming it
                folder = Path(spec) if Path(spec).is_dir() else Path(spec).parent
                manager = general_items.task_manager(str(folder))
                names = [
                    name
                    for name, entry in manager.task_index.items()
                    if entry.kind.name in ("TASK", "PY_TASK")
                    and (Path(spec).is_dir() or entry.yaml_path.resolve() == Path(spec).resolve())
                ]
                with contextlib.chdir(folder):
                    built = manager.load(names)["tasks"]
            else:
                manager = general_items.task_manager()
                built = manager.load(general_items.registered_tasks(spec))["tasks"]
        except ConfigError as exc:
            raise StageError(str(exc)) from None
        except Exception as exc:  # a data file the datasets library cannot read, a bad template
            first = " ".join(str(exc).split())[:300]
            raise StageError(
                f"general_ability.tasks: {spec}: lm-eval cannot load it ({type(exc).__name__}: {first})"
            ) from None
        if not built:
            raise StageError(
                f"general_ability.tasks: {spec}: lm-eval built no task from it (a group whose members "
                "are defined inline, or a YAML holding only a group?); name the tasks themselves"
            )
        tasks.update(built)
        sources.update((name, spec) for name in built)
    return tasks, sources


def task_items(results: dict, sources: dict[str, str]) -> tuple[list[dict], dict]:
    """Per-item rows of every numeric per-item metric lm-eval logged, and what each task was."""
    rows, info = [], {}
    for task, samples in results["samples"].items():
        better = results.get("higher_is_better", {}).get(task, {})
        measured = []
        for sample in samples:
            # lm-eval logs one sample per (item, filter); a filter other than "none" is its own measure,
            # named as lm-eval names it (`exact_match,strict-match`)
            filt = sample["filter"]  # lm-eval 0.4 logs it on every sample; "none" when unfiltered
            for metric in sample.get("metrics", []):
                value = sample.get(metric)
                if isinstance(value, bool | int | float) and not (
                    isinstance(value, float) and math.isnan(value)
                ):
                    name = metric if filt == "none" else f"{metric},{filt}"
                    if better.get(metric) is None:
                        raise StageError(
                            f"general_ability.tasks: task {task}: lm-eval does not say whether higher "
                            f"{metric} is better; give it `higher_is_better` in the task's metric_list"
                        )
                    rows.append(
                        {
                            "measure": f"{task}/{name}",
                            "item": str(sample["doc_id"]),
                            "hash": sample.get("doc_hash", "")[:16],
                            "value": float(value),
                        }
                    )
                    if name not in measured:
                        measured.append(name)
        info[task] = {
            "source": sources.get(task),
            "metrics": {m: {"higher_is_better": bool(better[m.split(",")[0]])} for m in measured},
            "n_shot": results.get("n-shot", {}).get(task),
            "version": results.get("versions", {}).get(task),
            "items": results.get("n-samples", {}).get(task),
        }
    return rows, info


def run_tasks(model, tok, cfg: dict, device: str, tasks: dict, sources: dict) -> tuple[list[dict], dict]:
    """lm-eval on the loaded ``tasks`` (load_tasks), every item's result logged."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=cfg["batch_size"], device=device)
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks.values()),  # built Task objects: simple_evaluate needs no task manager
        limit=cfg["limit"],
        num_fewshot=cfg["num_fewshot"],
        log_samples=True,
        bootstrap_iters=0,  # the paired bootstrap is compare's
        random_seed=0,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
    )
    return task_items(results, sources)


def measures_of(rows: list[dict], task_info: dict) -> dict:
    """Mean and n of each measure, with how to read it."""
    out = {}
    for name in dict.fromkeys(r["measure"] for r in rows):
        values = [r["value"] for r in rows if r["measure"] == name]
        if name == TEXT_LOSS:
            meta = {
                "label": "general text loss",
                "kind": "loss",
                "unit": "nats/token",
                "higher_is_better": False,
                "source": general_items.TEXT_SOURCE,
            }
        else:
            task, metric = name.rsplit("/", 1)
            meta = {
                "label": name,
                "kind": "score",
                "unit": metric,
                "higher_is_better": task_info[task]["metrics"][metric]["higher_is_better"],
                "source": f"lm-eval task {task} ({task_info[task]['source']})",
            }
        out[name] = {**meta, "n": len(values), "mean": sum(values) / len(values)}
    return out


def run(job: Job) -> dict:
    import lm_eval
    import torch

    from workflow_scripts.models.loading import (
        dtype_name,
        load_model,
        load_tokenizer,
        resolve_dtype,
        torch_device,
    )

    cfg, label, model_dir = job.params.general, job.params.label, job.input.model_dir
    set_threads(job.threads)
    t0 = time.perf_counter()
    text = cfg["text_loss"]
    passages = general_items.text_passages(text["passages"]) if text["enabled"] else []
    tasks, sources = load_tasks(cfg["tasks"]) if cfg["tasks"] else ({}, {})  # before the model: fail first
    device = torch_device()
    dtype = resolve_dtype(cfg["dtype"])
    model = load_model(model_dir, dtype=dtype, device=device).eval()
    tok = load_tokenizer(model_dir)
    rows, timings, task_info = [], {}, {}
    if passages:
        t = time.perf_counter()
        rows += text_losses(model, tok, passages, text["max_tokens"], cfg["batch_size"], device)
        timings["text_loss_s"] = round(time.perf_counter() - t, 2)
        timings["text_loss_s_per_100_items"] = round(100 * timings["text_loss_s"] / len(passages), 2)
        log.info("%s: text loss on %d passages in %.1f s", label, len(passages), timings["text_loss_s"])
    if cfg["tasks"]:
        t = time.perf_counter()
        task_rows, task_info = run_tasks(model, tok, cfg, device, tasks, sources)
        rows += task_rows
        n_items = len({(r["measure"].rsplit("/", 1)[0], r["item"]) for r in task_rows})
        timings["lm_eval_s"] = round(time.perf_counter() - t, 2)
        timings["lm_eval_s_per_100_items"] = round(100 * timings["lm_eval_s"] / max(n_items, 1), 2)
        log.info("%s: %d lm-eval items in %.1f s", label, n_items, timings["lm_eval_s"])
    if not rows:
        raise StageError("general_ability: no item was measured (every task empty?)")
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    result = {
        "model": label,
        "model_dir": str(model_dir),
        "settings": cfg,
        "measures": measures_of(rows, task_info),
        "text_loss": {
            "source": general_items.TEXT_SOURCE,
            "python": general_items.python_version(),
            "passages": len(passages),
            "max_tokens": text["max_tokens"],
            "tokens": sum(r.get("tokens", 0) for r in rows),
        }
        if passages
        else None,
        "lm_eval": {"version": lm_eval.__version__, "tasks": task_info} if cfg["tasks"] else None,
        "dtype": dtype_name(dtype),
        "device": device,
        "torch": torch.__version__,
        "timings": timings,
    }
    write_jsonl(job.output.item_results, rows)
    write_json(job.output.result, result)
    log.info("%s: %s", label, {k: round(v["mean"], 4) for k, v in result["measures"].items()})
    return result


if "snakemake" in globals():
    snakemake_main(snakemake, run)
