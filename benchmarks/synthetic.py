"""Randomly initialised models of a real model's shape, and the sample data formatted for them.

For benchmarks where the embedded model is not available (a GPU machine with no network):
throughput depends on the shape of a model, not on its weight values. `--model-config
benchmarks/configs/smollm2-135m.json` (or gemma3-270m.json, the published config.json of each
model) builds the model from its config with random weights, and a tokenizer trained in a
second on the sample itself (and config.yaml's system prompt): byte-level BPE with digits split
one by one, like the real tokenizers. On the formatted sample it gives 121.0 prompt + 61.1
completion tokens per example against 122.3 + 60.5 for the embedded SmolLM2 tokenizer (1,000
training examples), so sequence lengths and the labelled share of positions (33.5% vs 33.1%)
match. Its vocabulary is small (~580 entries; token ids use the first rows of the embedding),
but the model keeps its real vocabulary size: the LM head costs what it really costs.

The data is the workflow's own: download_dataset, preprocess_dataset and format_dataset run on
the sample with config.yaml's sections, exactly as the rules run them.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "benchmarks" / "configs"
CACHE = Path(os.environ.get("SNAKETUNE_BENCH_CACHE") or Path(tempfile.gettempdir()) / "snaketune_bench")
SAMPLE = REPO / "data" / "sample" / "finqa_sample.jsonl"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{% if role == 'system' %}{% set role = 'user' %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# (special tokens, tokenizer kwargs, chat template) of the turn format each real model uses
TURN_FORMATS = {
    "chatml": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
        CHATML,
    ),
    "gemma": (
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        {"eos_token": "<end_of_turn>", "pad_token": "<pad>", "bos_token": "<bos>"},
        GEMMA,
    ),
}


def config_path(name_or_path: str) -> Path:
    """`smollm2-135m`, `gemma3-270m` (shipped in benchmarks/configs/) or a config.json path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIGS / f"{name_or_path.removesuffix('.json')}.json"
    if not path.is_file():
        shipped = sorted(p.stem for p in CONFIGS.glob("*.json"))
        raise SystemExit(f"--model-config: {name_or_path} is neither a file nor one of {shipped}")
    return path


def turn_format(config: dict) -> str:
    return "gemma" if str(config.get("model_type", "")).startswith("gemma") else "chatml"


def corpus() -> list[str]:
    """The sample's text, plus the prompt text config.yaml adds (system prompt, role names): every
    word of it becomes one token, as it is in a real 49k-262k vocabulary."""
    import yaml

    with SAMPLE.open() as f:
        texts = [" ".join(str(v) for v in json.loads(line).values()) for line in f]
    mf = yaml.safe_load((REPO / "config.yaml").read_text())["messages_format"]["messages_format"]
    texts += [json.dumps(mf), "system user assistant model"]
    return texts


def train_tokenizer(fmt: str):
    """Byte-level BPE trained on the sample, digits split one by one (as SmolLM2's and Gemma's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, tokens, template = TURN_FORMATS[fmt]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)
    fast.chat_template = template
    return fast


def random_model_dir(config_file: Path, device: str = "cpu", seed: int = 0) -> Path:
    """A model folder (config, random bf16 weights, tokenizer, chat template), cached by content."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(config_file.read_text())
    fmt = turn_format(raw)
    key = hashlib.sha256(json.dumps([config_file.read_text(), corpus(), seed]).encode()).hexdigest()[:10]
    out = CACHE / f"{config_file.stem}-random-{key}"
    if (out / "manifest.json").is_file():
        return out
    tok = train_tokenizer(fmt)
    ids = {
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    config = AutoConfig.for_model(**{**raw, **ids})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    manifest = {
        "model_id": f"random:{config_file.name}",
        "chat_template": f"fallback:{fmt}",
        "params": n_params,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    tmp.rename(out)
    return out


def formatted_sample(cfg: dict, model_dir: Path) -> Path:
    """train/validation/test parquet of the sample and the token files of train and validation,
    through the workflow's own data stages."""
    from workflow_scripts.data import download_dataset, format_dataset, preprocess_dataset
    from workflow_scripts.stage import Job

    splits = ("train", "validation", "test")
    key = hashlib.sha256(
        json.dumps(
            [cfg["dataset"], cfg["messages_format"], cfg["filters"], cfg["training"]["max_length"]]
        ).encode()
    ).hexdigest()[:8]
    out = CACHE / f"data-{model_dir.name}-{key}"
    fmt = {s: str(out / "formatted" / f"{s}.parquet") for s in splits}
    # what training memory-maps (workflow_scripts/data/tokens.py), as the format_dataset rule names it
    fmt.update({f"{s}_tokens": str(out / "formatted" / f"{s}.tokens.arrow") for s in ("train", "validation")})
    if all(Path(f).is_file() for f in fmt.values()):
        return out / "formatted"
    dataset = dict(cfg["dataset"])
    if not Path(dataset["id"]).is_absolute() and (REPO / dataset["id"]).exists():
        dataset["id"] = str(REPO / dataset["id"])
    raw = {s: str(out / "raw" / f"{s}.parquet") for s in splits}
    download_dataset.run(
        Job(output={**raw, "sources": str(out / "raw" / "sources.json")}, params={"dataset": dataset})
    )
    pre = {s: str(out / "preprocessed" / f"{s}.parquet") for s in splits}
    preprocess_dataset.run(
        Job(
            input=raw,
            output={**pre, "report": str(out / "preprocessed" / "report.json")},
            params={"messages_format": cfg["messages_format"], "filters": cfg["filters"]},
        )
    )
    training = cfg["training"]
    format_dataset.run(
        Job(
            input={**pre, "model_dir": str(model_dir)},
            output={**fmt, "stats": str(out / "formatted" / "stats.json")},
            params={"format": {"max_length": training["max_length"], "overlength": training["overlength"]}},
        )
    )
    return out / "formatted"


def prepare(model_config: str, cfg: dict, device: str = "cpu") -> tuple[Path, Path]:
    """(model folder, formatted data folder) for ``--model-config``."""
    model_dir = random_model_dir(config_path(model_config), device)
    return model_dir, formatted_sample(cfg, model_dir)
