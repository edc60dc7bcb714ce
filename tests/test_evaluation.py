"""Evaluation: answer parsing, batched == sequential generation, bootstrap CI, bad test splits."""

import json

import pandas as pd
import pytest
from helpers import with_defaults

from workflow_scripts.evaluation import compare as compare_stage
from workflow_scripts.evaluation.answers import extract_answer, follows_format, is_correct, parse_number
from workflow_scripts.evaluation.bootstrap import paired_bootstrap_ci
from workflow_scripts.stage import Job, StageError


@pytest.mark.parametrize(
    "text, value, percent",
    [
        ("1,234.5", 1234.5, False),
        ("$1,234,567", 1234567, False),
        ("(123)", -123, False),
        ("($45.2)", -45.2, False),
        ("-12.5%", -12.5, True),
        ("12.5 percent", 12.5, True),
        ("3.2 times", 3.2, False),
        ("15 days", 15, False),
        ("€7", 7, False),
    ],
)
def test_parse_number(text, value, percent):
    n = parse_number(text)
    assert n.value == pytest.approx(value) and n.percent == percent


def test_parse_scale_words():
    assert parse_number("$1.2 billion").scale == 1e9
    assert parse_number("5 million").scale == 1e6
    assert parse_number("$5m").scale == 1e6


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("<think>a</think>\nThe answer is 30.", "The answer is 30.", True),
        (
            "<think>The answer is 7</think>\nThe answer is 30.",
            "The answer is 30.",
            True,
        ),  # after </think> wins
        ("<think>x</think>\nThe answer is 31.", "The answer is 30.", False),
        ("The answer is 30.2", "The answer is 30.", True),  # rounds to 30, the reference's 0 decimals
        ("The answer is 30.6", "The answer is 30.", False),  # within 1%, but rounds to 31
        ("The answer is $703.1", "The answer is 705.25.", False),  # within 1%, not at 2 decimals
        ("The answer is 0.25", "The answer is 25.0%.", True),  # fraction vs percent
        ("The answer is 25%", "The answer is 0.25.", True),
        ("The answer is (12)", "The answer is -12.", True),  # parenthesised negative
        ("The answer is $1,200 million", "The answer is 1.2 billion.", True),
        ("The answer is 1,200", "1200 million", True),  # scale omitted on one side
        ("Answer: Net income", "The answer is net income.", True),  # non-numeric: normalised match
        ("Answer: revenue", "The answer is net income.", False),
        ("I don't know", "The answer is 30.", False),
    ],
)
def test_is_correct(prediction, reference, expected):
    """The default matching: numbers at the precision the reference shows (tests/test_answers.py)."""
    assert is_correct(prediction, reference, 0.01) is expected


def test_extract_answer_and_format():
    assert extract_answer("<think>\nx = 2\n</think>\nThe answer is 2016.") == "2016"
    assert follows_format("<think>\nx\n</think>\nThe answer is 3.")
    assert not follows_format("The answer is 3.")
    assert not follows_format("<think>\nx\n</think>\n")


def settings_of(**values):
    """Generation settings: ``values`` on top of the schema's evaluation defaults."""
    from workflow_scripts.evaluation.generate import GenerationSettings

    return GenerationSettings.from_config(with_defaults("evaluation", values))


def test_batched_greedy_equals_one_at_a_time(tiny_model_dir, tiny_tokenizer):
    from workflow_scripts.evaluation.generate import generate
    from workflow_scripts.models.loading import load_model

    model = load_model(tiny_model_dir)
    prompts = [
        tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in [
            "What was revenue in 2019?",
            "Hi",
            "Table: | a | 1 |\nQuestion: sum?",
            "x " * 40,
            "ratio",
            "2020",
        ]
    ]
    batched = generate(model, tiny_tokenizer, prompts, settings_of(max_new_tokens=12, batch_size=4), False)
    single = generate(model, tiny_tokenizer, prompts, settings_of(max_new_tokens=12, batch_size=1), False)
    assert batched["token_ids"] == single["token_ids"]
    assert all(0 < len(t) <= 12 for t in batched["token_ids"])
    # and both equal Hugging Face's own greedy generate for a single prompt
    ids = tiny_tokenizer(prompts[1], add_special_tokens=False, return_tensors="pt")["input_ids"]
    hf = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    ref = [t for t in hf[0, ids.shape[1] :].tolist() if t != tiny_tokenizer.eos_token_id]
    assert single["token_ids"][1] == ref[: len(single["token_ids"][1])]


def test_streaming_is_the_generators_own_decode_path(tiny_model_dir, tiny_tokenizer):
    """stream (the chat command's generator) hands one prompt's answer out as it grows, with the
    tokens generate gives that prompt: greedy, and sampled (temperature, top_p) from the same seed."""
    from workflow_scripts.evaluation.generate import generate, stream
    from workflow_scripts.models.loading import load_model

    model = load_model(tiny_model_dir)
    greedy = settings_of(max_new_tokens=12, batch_size=1)
    sampled = settings_of(max_new_tokens=12, batch_size=1, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
    answers = {}
    for prompt in _eval_prompts(tiny_tokenizer, ["What was revenue in 2019?", "ratio of x to y"]):
        ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for name, s in (("greedy", greedy), ("sampled", sampled)):
            expected = generate(model, tiny_tokenizer, [prompt], s, progress=False)
            pieces = []
            streamed = stream(model, tiny_tokenizer, ids, s, pieces.append)
            assert streamed == expected["token_ids"][0]
            assert "".join(pieces) == expected["texts"][0] and len(pieces) > 1
            answers.setdefault(name, []).append(streamed)
    assert answers["greedy"] != answers["sampled"]


def test_shared_prefix_generation_equals_one_at_a_time(tiny_model_dir, tiny_tokenizer):
    """Prompts from one template share a long prefix; it is encoded once and must change nothing."""
    from workflow_scripts.evaluation.generate import common_prefix_length, generate
    from workflow_scripts.models.loading import load_model

    model = load_model(tiny_model_dir)
    system = "Answer the question about the table. Think step by step, then give the answer."
    prompts = [
        tiny_tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": q}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in [
            "What was revenue in 2019?",
            "Sum?",
            "Table: | a | 1 |\nQuestion: what was a?",
            "ratio of x to y",
        ]
    ]
    ids = [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert common_prefix_length(ids) >= 8
    shared = generate(model, tiny_tokenizer, prompts, settings_of(max_new_tokens=10, batch_size=4), False)
    plain = generate(
        model,
        tiny_tokenizer,
        prompts,
        settings_of(max_new_tokens=10, batch_size=4, share_prefix=False),
        False,
    )
    single = generate(model, tiny_tokenizer, prompts, settings_of(max_new_tokens=10, batch_size=1), False)
    assert shared["token_ids"] == single["token_ids"] == plain["token_ids"]


def test_sliding_window_models_get_unpadded_batches_when_padding_could_leave_the_window():
    from workflow_scripts.evaluation.generate import make_batches

    lengths = [10, 12, 10, 12, 11, 30]
    # no sliding window: length-sorted batches of up to 4
    assert make_batches(lengths, 4, 8, None) == [[0, 2, 4, 1], [3, 5]]
    # window 100: every padded sequence fits, padding cannot change what attention sees
    assert make_batches(lengths, 4, 8, 100) == [[0, 2, 4, 1], [3, 5]]
    # window 16: 10 + 8 > 16, so each batch holds one prompt length only
    assert make_batches(lengths, 4, 8, 16) == [[0, 2], [4], [1, 3], [5]]


def test_paired_bootstrap_ci_known_cases():
    delta, lo, hi = paired_bootstrap_ci([0] * 50, [1] * 50, samples=500, seed=0)
    assert (delta, lo, hi) == (1.0, 1.0, 1.0)
    base = [0, 1] * 100
    delta, lo, hi = paired_bootstrap_ci(base, base[::-1], samples=2000, seed=3)
    assert delta == 0.0 and lo < 0 < hi
    # 30 of 100 improve, none regress: the CI is around 0.3 and excludes zero
    delta, lo, hi = paired_bootstrap_ci([0] * 100, [1] * 30 + [0] * 70, samples=4000, seed=1)
    assert delta == pytest.approx(0.3) and 0.2 < lo < 0.3 < hi < 0.4


def write_eval(tmp_path, name, correct, types):
    rows = [
        {
            "prompt": f"p{i}",
            "correct": c,
            "follows_format": c,
            "rougeL": float(c),
            "meta": {"question_type": t},
        }
        for i, (c, t) in enumerate(zip(correct, types, strict=False))
    ]
    pred = tmp_path / f"{name}.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = tmp_path / f"{name}.json"
    ev.write_text(json.dumps({"metrics": {"answer_accuracy": sum(correct) / len(correct), "rouge1": 0.5}}))
    return str(ev), str(pred)


def test_compare_writes_report_and_plots(tmp_path):
    types = ["lookup", "sum"] * 20
    base = write_eval(tmp_path, "base", [0] * 40, types)
    tuned = write_eval(tmp_path, "tuned", [1, 0] * 20, types)
    out = {k: str(tmp_path / k) for k in ("c.json", "c.md", "m.png", "t.png")}
    cfg = with_defaults("evaluation", {"bootstrap_samples": 500, "seed": 0, "type_column": "question_type"})
    job = Job(
        input={
            "base": base[0],
            "finetuned": tuned[0],
            "base_predictions": base[1],
            "finetuned_predictions": tuned[1],
        },
        output=dict(
            zip(("comparison", "markdown", "metrics_plot", "by_type_plot"), out.values(), strict=True)
        ),
        params={"evaluation": cfg},
    )
    report = compare_stage.run(job)
    acc = report["metrics"]["answer_accuracy"]
    assert acc["delta"] == 0.5 and acc["significant"]
    assert report["accuracy_by_type"]["lookup"] == {"n": 20, "base": 0.0, "finetuned": 1.0}
    assert "| answer_accuracy | 0.000 | 0.500 | +0.500 *" in open(out["c.md"]).read()


def test_empty_test_split_and_missing_reference_are_named(tmp_path, tiny_model_dir):
    from workflow_scripts.evaluation import evaluate_model

    cfg = with_defaults(
        "evaluation",
        {"metrics": ["answer_accuracy"], "max_new_tokens": 4, "batch_size": 2, "answer_tolerance": 0.01},
    )

    def evaluate(test):
        return evaluate_model.run(
            Job(
                input={"model_dir": str(tiny_model_dir), "prompts": str(test)},
                output={"evaluation": str(tmp_path / "e.json"), "predictions": str(tmp_path / "p.jsonl")},
                params={"evaluation": cfg, "label": "base"},
            )
        )

    empty = tmp_path / "test.parquet"
    pd.DataFrame({"prompt_text": pd.Series([], dtype=str), "reference": pd.Series([], dtype=str)}).to_parquet(
        empty
    )
    with pytest.raises(StageError, match=r"prompts file .*test.parquet is empty"):
        evaluate(empty)
    no_ref = tmp_path / "noref.parquet"
    pd.DataFrame({"prompt_text": ["hi"]}).to_parquet(no_ref)
    with pytest.raises(StageError, match=r"noref.parquet has no 'reference' column"):
        evaluate(no_ref)
    assert not (tmp_path / "e.json").exists()


def test_evaluate_model_writes_metrics_and_predictions(tmp_path, tiny_model_dir, tiny_tokenizer):
    from workflow_scripts.evaluation import evaluate_model

    prompts = [
        tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": f"q{i}"}], tokenize=False, add_generation_prompt=True
        )
        for i in range(5)
    ]
    test = tmp_path / "test.parquet"
    pd.DataFrame(
        {
            "prompt_text": prompts,
            "reference": ["The answer is 3."] * 5,
            "meta": ['{"question_type": "lookup"}'] * 5,
        }
    ).to_parquet(test)
    cfg = {
        "metrics": ["rouge", "answer_accuracy", "bertscore"],
        "bertscore_model": "embedded:all-minilm-l6-v2",
        "bertscore_num_layers": 6,
        "max_new_tokens": 6,
        "batch_size": 2,
        "answer_tolerance": 0.01,
    }
    result = evaluate_model.run(
        Job(
            input={"model_dir": str(tiny_model_dir), "prompts": str(test)},
            output={"evaluation": str(tmp_path / "e.json"), "predictions": str(tmp_path / "p.jsonl")},
            params={"evaluation": with_defaults("evaluation", cfg), "label": "base"},
        )
    )
    m = result["metrics"]
    assert {
        "answer_accuracy",
        "rouge1",
        "rougeL",
        "bertscore_f1",
        "format_following",
        "mean_generated_tokens",
    } <= set(m)
    assert m["bertscore_model"]["layer"] == 6
    rows = [json.loads(x) for x in open(tmp_path / "p.jsonl")]
    assert len(rows) == 5 and {"prompt", "reference", "prediction", "extracted_answer", "correct"} <= set(
        rows[0]
    )


def _eval_prompts(tokenizer, questions):
    return [
        tokenizer.apply_chat_template(
            [
                {"role": "system", "content": "Answer the question about the table."},
                {"role": "user", "content": q},
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in questions
    ]


def test_long_uneven_prompts_prefill_apart_and_decode_together(tiny_model_dir, tiny_tokenizer):
    """FinQA-length prompts of many lengths: prefilled in equal-length groups (no padding), their
    caches merged for batched decoding, with and without the shared prefix, past the KV reserve."""
    from workflow_scripts.evaluation.generate import generate, prefill_groups
    from workflow_scripts.models.loading import load_model

    model = load_model(tiny_model_dir)
    filing = "Revenue increased 12% in 2019 compared with 2018, primarily due to higher volumes. "
    prompts = _eval_prompts(
        tiny_tokenizer,
        [filing * k + f"Table: | a | {k} |\nQuestion: what was a?" for k in (1, 9, 4, 4, 14, 2, 7)],
    )
    lengths = [len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(prefill_groups(lengths)) > 1 and max(lengths) > 150
    single = generate(model, tiny_tokenizer, prompts, settings_of(max_new_tokens=16, batch_size=1), False)
    for share in (True, False):
        s = settings_of(max_new_tokens=16, batch_size=8, share_prefix=share)
        batched = generate(model, tiny_tokenizer, prompts, s, False)
        assert batched["token_ids"] == single["token_ids"]
        assert batched["path"]["prefill"] == "length groups, merged"


def test_prefill_groups_trade_padding_against_forwards():
    from workflow_scripts.evaluation.generate import prefill_groups

    lengths = [100, 700, 102, 400, 101, 705]
    # padding of a few tokens is cheaper than a forward; hundreds of tokens are not
    assert prefill_groups(lengths, forward_tokens=48) == [[0, 4, 2], [3], [1, 5]]
    assert prefill_groups(lengths, forward_tokens=0) == [[0], [4], [2], [3], [1], [5]]
    assert prefill_groups(lengths, forward_tokens=10**6) == [[0, 4, 2, 3, 1, 5]]
    assert prefill_groups([]) == []


def test_reserved_cache_layer_grows_and_selects_rows():
    import torch

    from workflow_scripts.evaluation.generate import ReservedLayer

    layer = ReservedLayer(reserve=2)
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).reshape(2, 1, 3, 2)
    keys, _ = layer.update(k, -k)
    assert torch.equal(keys, k) and layer.get_seq_length() == 3
    for step in range(4):  # two steps fit the reserve, two more grow it
        new = torch.full((2, 1, 1, 2), float(step))
        keys, values = layer.update(new, -new)
    assert (
        keys.shape == (2, 1, 7, 2)
        and torch.equal(keys[:, :, :3], k)
        and torch.equal(values[:, :, 3:], -keys[:, :, 3:])
    )
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys[0, :, :3], k[1]) and layer.get_seq_length() == 7


def test_evaluation_records_dtype_path_and_bf16_agreement(tmp_path, tiny_model_dir, tiny_tokenizer):
    from workflow_scripts.evaluation import evaluate_model

    test = tmp_path / "test.parquet"
    prompts = _eval_prompts(tiny_tokenizer, ["What was revenue in 2019?", "Sum?", "Table: | a | 1 |", "x"])
    pd.DataFrame({"prompt_text": prompts, "reference": ["The answer is 3."] * 4}).to_parquet(test)

    def evaluate(**values):
        cfg = {"metrics": ["answer_accuracy"], "max_new_tokens": 8, "batch_size": 4, **values}
        return evaluate_model.run(
            Job(
                input={"model_dir": str(tiny_model_dir), "prompts": str(test)},
                output={"evaluation": str(tmp_path / "e.json"), "predictions": str(tmp_path / "p.jsonl")},
                params={"evaluation": with_defaults("evaluation", cfg), "label": "base"},
            )
        )

    bf16 = evaluate(dtype="bfloat16", dtype_check_examples=3)["generation"]
    assert bf16["dtype"] == "bfloat16" and bf16["dtype_setting"] == "bfloat16"
    agreement = bf16["dtype_agreement"]
    assert agreement["reference"] == "float32" and agreement["examples"] == 3
    assert 0 <= agreement["identical"] <= 3 and 0.0 <= agreement["mean_agreeing_prefix"] <= 1.0
    assert agreement["identical_rate"] == agreement["identical"] / 3
    assert json.loads((tmp_path / "e.json").read_text())["generation"]["dtype_agreement"] == agreement
    fp32 = evaluate(dtype="float32")["generation"]
    assert fp32["dtype"] == "float32" and fp32["dtype_agreement"] is None
    assert fp32["path"]["generator"] == "snaketune" and fp32["path"]["batches"] == 1
    assert evaluate(dtype="bfloat16", dtype_check_examples=0)["generation"]["dtype_agreement"] is None


def test_auto_dtype_follows_the_measured_bf16_speed(monkeypatch):
    import torch

    from workflow_scripts.models import loading

    fast, sec16, sec32 = loading.bf16_speed("cpu")  # measured on this machine
    assert sec16 > 0 and sec32 > 0 and fast == (sec16 < 0.8 * sec32)
    monkeypatch.setattr(loading, "bf16_speed", lambda device: (True, 0.001, 0.002))
    assert loading.resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(loading, "bf16_speed", lambda device: (False, 0.1, 0.002))
    assert loading.resolve_dtype("auto", "cpu") == torch.float32
    assert loading.resolve_dtype("float32", "cuda") == torch.float32
