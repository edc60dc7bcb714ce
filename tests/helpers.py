"""Plain helpers the tests import (``from helpers import ...``): the repository paths and the
sample rows (``REPO``, ``SAMPLE``, ``sample_rows``); a tiny tokenizer and tiny Llama models built in
code (``train_bpe_tokenizer``, ``build_tokenizer``, ``build_tiny_llama``, ``save_tiny_model``,
``save_lively_model``); config sections with the schema's defaults (``with_defaults``); stage Jobs
and their inputs (``train_job``, ``merge_job``, ``write_formatted``, ``preprocessed_rows``); and
Snakemake runs of a workflow copy (``new_workflow``, ``copy_run``, ``write_config``, ``tiny_config``,
``SNAKEMAKE``, ``snakemake_env``, ``smk``, ``planned_rules``, ``tree_digest``).

No fixtures here: they live in ``conftest.py``, which also sets up the session (the repository on
``sys.path``, offline/disabled defaults for the Hub and W&B). pytest puts ``tests/`` on
``sys.path`` when it loads that conftest, so test modules import this one as ``helpers``; scripts
outside pytest (``tests/slurm/run_slurm_test.sh``) put ``tests/`` on ``sys.path`` themselves."""

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "finqa_sample.jsonl"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def sample_rows(n: int) -> list[dict]:
    rows = []
    with SAMPLE.open() as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def train_bpe_tokenizer(specials: list[str], **tokens):
    """A byte-level BPE tokenizer trained on the sample in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [" ".join(r.values()) for r in sample_rows(300)] + ["system user assistant Answer the question"]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)


def build_tokenizer():
    """The tiny test tokenizer with ChatML."""
    from workflow_scripts.models.families import TEMPLATES

    fast = train_bpe_tokenizer(SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = TEMPLATES["chatml"].jinja
    return fast


def build_tiny_llama(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    tok = build_tokenizer()
    model = build_tiny_llama(len(tok), seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "manifest.json").write_text(
        json.dumps({"model_id": "tiny-test", "chat_template": "fallback:chatml"})
    )
    return path


def tiny_gemma3_text():
    """Gemma 3 text, tiny: a sliding window (8) shorter than most test batches, GQA."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )
    return Gemma3ForCausalLM(cfg)


def with_defaults(section: str, values: dict | None = None) -> dict:
    """One config section as the stages receive it: ``values`` with the schema's defaults filled in."""
    from snakemake.utils import validate

    from workflow_scripts.config import SCHEMA_FILE

    config = {section: copy.deepcopy(values or {})}
    validate(config, str(SCHEMA_FILE))
    return config[section]


def train_job(out: Path, formatted: dict, model_dir, training: dict, peft: dict):
    """The train rule's Job (reading ``write_formatted``'s token files), writing under ``out``, its
    config sections completed with the schema's defaults."""
    from workflow_scripts.stage import Job

    return Job(
        input={
            "train": formatted["train_tokens"],
            "validation": formatted["validation_tokens"],
            "model_dir": str(model_dir),
        },
        output={
            "adapter_dir": str(out / "model"),
            "metrics": str(out / "training" / "metrics.csv"),
            "loss_plot": str(out / "training" / "loss.png"),
            "run_info": str(out / "training" / "run.json"),
        },
        params={
            "training": with_defaults("training", training),
            "peft": with_defaults("peft", peft),
            "wandb": with_defaults("wandb", {"mode": "disabled"}),
            "experiment": "test",
            "gpus": 0,
            "checkpoint_dir": str(out / "checkpoints"),
        },
        threads=1,
    )


def merge_job(model_dir, trained, test: str, deployment_dir: Path):
    """The merge rule's Job for the adapter ``trained`` wrote."""
    from workflow_scripts.stage import Job

    return Job(
        input={
            "model_dir": str(model_dir),
            "adapter_dir": trained.output.adapter_dir,
            "run_info": trained.output.run_info,
            "test": test,
        },
        output={"deployment_dir": str(deployment_dir)},
    )


def new_workflow(dest: Path) -> Path:
    """A copy of the workflow at ``dest``, so runs do not touch the checkout's results/."""
    dest.mkdir(parents=True)
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(REPO / name, dest / name)
    for name in ("rules", "schemas", "envs", "profiles"):
        shutil.copytree(REPO / name, dest / name)
    (dest / "workflow_scripts").symlink_to(REPO / "workflow_scripts")
    (dest / "data").symlink_to(REPO / "data")
    return dest


def copy_run(src: Path, dest: Path) -> Path:
    """A copy of a workflow folder after a run (results/, models/, .snakemake/ and the config files,
    modification times kept), so a test can go on from a shared finished run without changing it."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake_env() -> dict[str, str]:
    # the user's MODEL_ID / DATASET would override the test configs
    return {k: v for k, v in os.environ.items() if k not in ("MODEL_ID", "DATASET")}


def smk(workdir: Path, *args, check=True, timeout=1200) -> subprocess.CompletedProcess:
    """``snakemake --cores 2 *args`` in ``workdir``; with ``check``, a failure shows the end of its output."""
    proc = subprocess.run(
        [*SNAKEMAKE, "--cores", "2", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=snakemake_env(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def tree_digest(root: Path, skip=("results", "models", ".snakemake")) -> str:
    """Names, sizes and mtimes of everything outside results/, models/ and .snakemake/."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] in skip or p.is_symlink():
            continue
        st = p.stat()
        h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def planned_rules(workdir: Path, target: str, *configfiles: Path) -> set[str]:
    """The rules `snakemake -n` would run for ``target`` (a path, "all", or a rule name)."""
    # a stage and what it needs: `--until <rule>` (rules with wildcards cannot be targets by name)
    goal = [target] if target == "all" or "/" in target else ["--until", target]
    args = ["-n", *goal, "--configfile", *map(str, configfiles)]  # one flag: a repeated flag replaces
    out = smk(workdir, *args).stdout
    if "Nothing to be done" in out:
        return set()
    return set(re.findall(r"^rule (\w+):", out, flags=re.M)) - {"all"}


def write_formatted(tmp_path: Path, formatter, tok, n_train: int = 24, n_eval: int = 8) -> dict[str, str]:
    """Formatted train/validation/test parquet files of sample rows, with the columns format_dataset
    writes (``formatter``: a model's ChatFormatter, from load_chat_formatter), and the token files
    of train and validation (``train_tokens``, ``validation_tokens``: the same ids and prompt
    lengths). Rendered with format_dataset's own ``render_example``; no example is over length."""
    import pandas as pd

    from workflow_scripts.data.formatting import render_example
    from workflow_scripts.data.tokens import SUFFIX, TokensWriter

    def ids_of(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]  # the template writes any BOS

    def train_row(messages: list[dict]) -> dict:
        prompt, completion = render_example(formatter, messages)
        prompt_ids = ids_of(prompt)
        return {
            "messages": json.dumps(messages, ensure_ascii=False),
            "prompt_text": prompt,
            "completion_text": completion,
            "input_ids": prompt_ids + ids_of(completion),
            "prompt_length": len(prompt_ids),
            "meta": "{}",
        }

    def test_row(messages: list[dict], reference: str) -> dict:
        prompt = formatter.render(messages, add_generation_prompt=True)
        return {
            "messages": json.dumps(messages, ensure_ascii=False),
            "prompt_text": prompt,
            "prompt_length": len(ids_of(prompt)),
            "query": "",
            "reference": reference,
            "target": "",
            "meta": "{}",
        }

    rows = sample_rows(n_train + n_eval)
    convs = [
        [
            {"role": "system", "content": "Answer."},
            {"role": "user", "content": r["Open-ended Verifiable Question"]},
            {"role": "assistant", "content": f"<think>\n{r['Complex_CoT']}\n</think>\n{r['Response']}"},
        ]
        for r in rows
    ]
    data = {
        "train": [train_row(c) for c in convs[:n_train]],
        "validation": [train_row(c) for c in convs[n_train:]],
        "test": [
            test_row(c[:2], r["Response"]) for c, r in zip(convs[n_train:], rows[n_train:], strict=True)
        ],
    }
    paths = {}
    for split, split_rows in data.items():
        paths[split] = str(tmp_path / f"{split}.parquet")
        pd.DataFrame(split_rows).to_parquet(paths[split])
        if split != "test":
            paths[f"{split}_tokens"] = str(tmp_path / f"{split}{SUFFIX}")
            writer = TokensWriter(paths[f"{split}_tokens"])
            writer.write([r["input_ids"] for r in split_rows], [r["prompt_length"] for r in split_rows])
            writer.close()
    return paths


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_config(wf: Path, model_dir: Path, sample: Path) -> Path:
    """tiny.yaml: the tiny model on the sample rows, everything else the defaults."""
    return write_config(
        wf / "tiny.yaml",
        {
            "experiment": "tiny",
            "model": {"id": str(model_dir), "name": "tiny"},
            "dataset": {"id": str(sample)},
            "wandb": {"mode": "disabled"},
        },
    )


def save_lively_model(path: Path, tok) -> Path:
    """The tiny Llama for ``tok`` with weights scaled up: its greedy answers are varied text, not
    one repeated token, so equal answers mean something."""
    import torch

    model = build_tiny_llama(len(tok), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(8)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def preprocessed_rows(path) -> list[dict]:
    """A preprocessed split (parquet) as rows: messages as dicts, meta as the dict it encodes."""
    import pandas as pd

    rows = pd.read_parquet(path).to_dict("records")
    for row in rows:
        row["messages"] = [dict(m) for m in row["messages"]]
        row["meta"] = json.loads(row["meta"])
    return rows
