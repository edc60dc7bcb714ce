"""download_dataset, preprocess_dataset, format_dataset on tiny inputs, including bad input."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from helpers import preprocessed_rows, with_defaults

from workflow_scripts.data import download_dataset, format_dataset, preprocess_dataset
from workflow_scripts.stage import Job, StageError

SPLITS = ("train", "validation", "test")


def download(dataset: dict, out: dict) -> dict:
    """The download_dataset rule's job: ``out`` holds a path per split and ``sources``."""
    return download_dataset.run(Job(output=out, params={"dataset": dataset}))


def preprocess(raw: dict, out: dict, report: str, mf: dict, filters: dict) -> dict:
    job = Job(
        input=raw,
        output={**out, "report": report},
        params={"messages_format": mf, "filters": with_defaults("filters", filters)},
    )
    return preprocess_dataset.run(job)


def format_splits(preprocessed: dict, model_dir: str, out: dict, stats: str, fmt: dict) -> dict:
    job = Job(
        input={**preprocessed, "model_dir": model_dir}, output={**out, "stats": stats}, params={"format": fmt}
    )
    return format_dataset.run(job)


def dataset_cfg(path, **kw):
    cfg = {"id": str(path), "config": None, "revision": None, "max_rows": None}
    cfg.update(data_files=None, split_names=None)
    cfg["split"] = {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 1}
    cfg.update(kw)
    return cfg


def outputs(tmp_path, kind="raw", ext="parquet"):
    out = {s: str(tmp_path / kind / f"{s}.{ext}") for s in SPLITS}
    if kind == "raw":
        out["sources"] = str(tmp_path / kind / "sources.json")
    return out


def test_download_splits_a_single_file_by_ratio(sample_jsonl, tmp_path):
    counts = download(dataset_cfg(sample_jsonl), outputs(tmp_path))
    assert counts == {"train": 96, "validation": 12, "test": 12}
    frames = {s: pd.read_parquet(tmp_path / "raw" / f"{s}.parquet") for s in SPLITS}
    prompts = [set(f["Open-ended Verifiable Question"]) for f in frames.values()]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2])


def test_download_keeps_existing_splits_and_caps_rows(sample_jsonl, tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    rows = [json.loads(line) for line in sample_jsonl.read_text().splitlines()]
    pd.DataFrame(rows[:100]).to_csv(folder / "train.csv", index=False)
    pd.DataFrame(rows[100:]).to_csv(folder / "test.csv", index=False)
    counts = download(dataset_cfg(folder, max_rows=50), outputs(tmp_path))
    assert counts["test"] == 20  # kept as given, below the cap
    assert counts["train"] == 50 and counts["validation"] == 11  # carved from train (100 * 0.1 / 0.9)


def test_download_errors_name_the_path_and_leave_nothing(tmp_path):
    out = outputs(tmp_path)
    with pytest.raises(StageError, match="missing.jsonl does not exist"):
        download(dataset_cfg(tmp_path / "missing.jsonl"), out)
    bad = tmp_path / "data.txt"
    bad.write_text("x")
    with pytest.raises(StageError, match=r"unsupported file format '.txt'"):
        download(dataset_cfg(bad), out)
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def test_download_hub_failure_says_how_to_use_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StageError, match="point dataset.id at a local"):
        download(dataset_cfg("someone/not-a-dataset-xyz"), outputs(tmp_path))


@pytest.fixture
def raw_splits(sample_jsonl, tmp_path):
    download(dataset_cfg(sample_jsonl), outputs(tmp_path))
    return outputs(tmp_path)


def mf_default(resolved_config):
    return resolved_config()["messages_format"], resolved_config()["filters"]


def test_preprocess_builds_messages_and_test_references(raw_splits, tmp_path, resolved_config):
    mf, filters = mf_default(resolved_config)
    out = outputs(tmp_path, "pre")
    report = preprocess(raw_splits, out, str(tmp_path / "report.json"), mf, filters)
    train = preprocessed_rows(out["train"])
    assert [m["role"] for m in train[0]["messages"]] == ["system", "user", "assistant"]
    assert train[0]["messages"][2]["content"].startswith("<think>\n")
    test = preprocessed_rows(out["test"])
    assert [m["role"] for m in test[0]["messages"]] == ["system", "user"]
    assert test[0]["reference"].startswith("The answer is")
    assert test[0]["meta"]["question_type"]
    assert report["train"]["rows_kept"] == 96


def test_preprocess_counts_each_filter_reason(raw_splits, tmp_path, resolved_config):
    mf, _ = mf_default(resolved_config)
    frame = pd.read_parquet(raw_splits["train"])
    frame.loc[0, "Complex_CoT"] = "   "
    frame.loc[1, "Open-ended Verifiable Question"] = frame.loc[2, "Open-ended Verifiable Question"]
    frame.loc[3, "Response"] = "no number here"
    frame.to_parquet(raw_splits["train"])
    filters = {
        "drop_empty": True,
        "min_chars": {},
        "max_chars": {"question": 10_000},
        "deduplicate_prompts": True,
    }
    filters["answer_regex"] = r"\d"
    report = preprocess(raw_splits, outputs(tmp_path, "pre"), str(tmp_path / "r.json"), mf, filters)
    assert report["train"]["dropped"] == {"answer_regex": 1, "duplicate_prompt": 1, "empty:cot": 1}
    assert report["train"]["rows_kept"] == 93


def test_preprocess_all_filtered_is_an_error_and_writes_nothing(raw_splits, tmp_path, resolved_config):
    mf, _ = mf_default(resolved_config)
    filters = {
        "drop_empty": True,
        "min_chars": {"question": 100_000},
        "max_chars": {},
        "deduplicate_prompts": True,
    }
    out = outputs(tmp_path, "pre")
    with pytest.raises(StageError, match="every row of the train split was filtered out.*too_short:question"):
        preprocess(raw_splits, out, str(tmp_path / "r.json"), mf, filters)
    assert not (tmp_path / "pre").exists() and not (tmp_path / "r.json").exists()


def test_preprocess_missing_column_lists_the_columns(raw_splits, tmp_path, resolved_config):
    mf, filters = mf_default(resolved_config)
    mf["training_columns"]["cot"] = "Reasoning"
    with pytest.raises(StageError) as err:
        preprocess(raw_splits, outputs(tmp_path, "pre"), str(tmp_path / "r.json"), mf, filters)
    msg = str(err.value)
    assert "messages_format.training_columns.cot" in msg and "'Reasoning'" in msg and "Complex_CoT" in msg
    assert not (tmp_path / "pre").exists()


def test_preprocess_unknown_placeholder_is_named(raw_splits, tmp_path, resolved_config):
    mf, filters = mf_default(resolved_config)
    mf["messages_format"]["messages"][2]["content"] = "{reasoning} {response}"
    with pytest.raises(StageError, match=r"unknown placeholder \{reasoning\}; defined names: cot, question"):
        preprocess(raw_splits, outputs(tmp_path, "pre"), str(tmp_path / "r.json"), mf, filters)


def test_preprocess_keeps_braces_in_data_literal(raw_splits, tmp_path, resolved_config):
    mf, filters = mf_default(resolved_config)
    frame = pd.read_parquet(raw_splits["train"])
    frame.loc[0, "Complex_CoT"] = 'JSON {"a": 1} and LaTeX \\frac{1}{2} and {cot}'
    frame.to_parquet(raw_splits["train"])
    mf["messages_format"]["messages"][2]["content"] = "{{literal}} {cot}"
    out = outputs(tmp_path, "pre")
    preprocess(raw_splits, out, str(tmp_path / "r.json"), mf, filters)
    first = preprocessed_rows(out["train"])[0]
    assert first["messages"][2]["content"] == '{literal} JSON {"a": 1} and LaTeX \\frac{1}{2} and {cot}'


@pytest.fixture
def preprocessed(raw_splits, tmp_path, resolved_config):
    mf, filters = mf_default(resolved_config)
    out = outputs(tmp_path, "pre")
    preprocess(raw_splits, out, str(tmp_path / "r.json"), mf, filters)
    return out


def test_format_tokenizes_prompt_plus_completion(preprocessed, tiny_model_dir, tiny_tokenizer, tmp_path):
    out = outputs(tmp_path, "fmt")
    stats = format_splits(
        preprocessed,
        str(tiny_model_dir),
        out,
        str(tmp_path / "stats.json"),
        {"max_length": 4096, "overlength": "drop"},
    )
    train = pd.read_parquet(out["train"])
    row = train.iloc[0]
    assert row["prompt_text"].endswith("<|im_start|>assistant\n")
    ids = list(row["input_ids"])
    assert (
        ids[: row["prompt_length"]]
        == tiny_tokenizer(row["prompt_text"], add_special_tokens=False)["input_ids"]
    )
    assert tiny_tokenizer.decode(ids[row["prompt_length"] :]) == row["completion_text"]
    assert row["completion_text"].endswith("<|im_end|>\n")
    test = pd.read_parquet(out["test"])
    assert set(test.columns) >= {"prompt_text", "reference", "meta"}
    assert stats["chat_template"] == "fallback:chatml"
    assert stats["train"]["tokens"]["p50"] > 0 and stats["train"]["dropped"] == 0


@pytest.mark.parametrize("mode", ["drop", "truncate"])
def test_format_overlength_rows_are_counted(preprocessed, tiny_model_dir, tmp_path, mode):
    out = outputs(tmp_path, "fmt")
    probe = format_splits(
        preprocessed,
        str(tiny_model_dir),
        out,
        str(tmp_path / "s.json"),
        {"max_length": 100_000, "overlength": mode},
    )
    limit = probe["train"]["tokens"]["p50"]
    stats = format_splits(
        preprocessed,
        str(tiny_model_dir),
        out,
        str(tmp_path / "s.json"),
        {"max_length": limit, "overlength": mode},
    )
    over = stats["train"]["over_max_length"]
    assert over > 0
    train = pd.read_parquet(out["train"])
    assert max(len(x) for x in train["input_ids"]) <= limit
    if mode == "drop":
        assert stats["train"]["dropped"] == over and len(train) == 96 - over
    else:
        assert stats["train"]["truncated"] + stats["train"]["dropped"] == over


def test_a_bad_row_in_a_worker_process_is_one_line(preprocessed, tiny_model_dir, tmp_path, monkeypatch):
    """(That worker processes format exactly as one process does: tests/test_streaming.py.)"""
    from workflow_scripts.data import formatting, sources

    monkeypatch.setattr(sources, "BATCH_ROWS", 16)  # several batches for the workers
    monkeypatch.setattr(formatting, "PROBE_ROWS", 8)  # the rows the light formatter is checked on
    fmt = {"max_length": 2048, "overlength": "drop"}
    # A template that fails on one row past the rows it is checked on: an error in a worker process
    # ends the stage with one line naming the cause, and no output is kept.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if 'BOOM' in m['content'] %}{{ raise_exception('a BOOM row') }}"
        "{% endif %}{% endfor %}" + template
    )
    rows = pd.read_parquet(preprocessed["train"])
    rows.loc[len(rows) - 1, "messages"][1]["content"] += " BOOM"  # the last row: past the probe's
    rows.to_parquet(preprocessed["train"])
    out = {**outputs(tmp_path, "bad"), "train_tokens": str(tmp_path / "bad.arrow")}
    job = Job(
        input={**preprocessed, "model_dir": str(model)},
        output={**out, "stats": str(tmp_path / "bad.json")},
        params={"format": fmt},
        threads=2,
    )
    with pytest.raises(StageError, match="formatting a train batch failed: .*a BOOM row"):
        format_dataset.run(job)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.arrow").exists()


def model_with_template_prefix(tiny_model_dir, dest: Path, prefix: str) -> Path:
    """A copy of the tiny model whose chat template starts with ``prefix``."""
    shutil.copytree(tiny_model_dir, dest)
    template = dest / "chat_template.jinja"
    template.write_text(prefix + template.read_text())
    return dest


def test_a_template_that_refuses_a_system_message_is_one_line(preprocessed, tiny_model_dir, tmp_path):
    """Several templates (Gemma 2's, Mistral's) raise on a system message: the stage ends at once
    with one line naming the model and the fix, never a Jinja traceback, and keeps nothing."""
    model = model_with_template_prefix(
        tiny_model_dir,
        tmp_path / "model",
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}",
    )
    rows = pd.read_parquet(preprocessed["train"])
    assert rows["messages"][0][0]["role"] == "system"  # the seed's format has a system prompt
    out = outputs(tmp_path, "fmt")
    with pytest.raises(StageError) as err:
        format_splits(
            preprocessed,
            str(model),
            out,
            str(tmp_path / "s.json"),
            {"max_length": 4096, "overlength": "drop"},
        )
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"format_dataset: the chat template of {model} refuses a system/user/assistant conversation "
        "(TemplateError: System role not supported); this template takes no system message: put the "
        "system prompt into the first user message in messages_format.messages"
    ), message
    assert not (tmp_path / "fmt").exists() and not (tmp_path / "s.json").exists()


def test_chat_template_kwargs_reach_every_rendering(preprocessed, tiny_model_dir, tmp_path):
    """model.chat_template_kwargs (e.g. Qwen3's enable_thinking) are passed to the template (by the
    portable renderer the worker processes receive: prepare_light checks it after a pickle round
    trip), recorded in stats.json, and read back with the prompt format (the chat command and
    export_gguf render with them)."""
    from workflow_scripts.data import formatting
    from workflow_scripts.evaluation.prompt_format import prompt_format_of

    model = model_with_template_prefix(
        tiny_model_dir,
        tmp_path / "model",
        "{% if enable_thinking is defined and not enable_thinking %}NOTHINK {% endif %}",
    )
    out = outputs(tmp_path, "fmt")
    fmt = {"max_length": 4096, "overlength": "drop", "chat_template_kwargs": {"enable_thinking": False}}
    job = Job(
        input={**preprocessed, "model_dir": str(model)},
        output={**out, "stats": str(tmp_path / "fmt" / "stats.json")},
        params={"format": fmt},
    )
    stats = format_dataset.run(job)
    for split in SPLITS:
        prompts = pd.read_parquet(out[split])["prompt_text"]
        assert prompts.str.startswith("NOTHINK <|im_start|>").all(), split
    assert stats["chat_template_kwargs"] == {"enable_thinking": False}
    assert prompt_format_of(out["test"]).template_kwargs == {"enable_thinking": False}
    # the portable renderer the worker processes get renders with them too (not a fallback)
    probe = preprocessed_rows(preprocessed["train"])[:4]
    for row in probe:
        row["meta"] = json.dumps(row["meta"])
    renderer, backend, why = formatting.prepare_light(
        str(model), 4096, "drop", fmt["chat_template_kwargs"], probe
    )
    assert why is None and renderer.render(probe[0]["messages"], True).startswith("NOTHINK <|im_start|>")


def test_chat_template_kwargs_key_the_formatted_data_only_when_set(resolved_config):
    from workflow_scripts.layout import format_settings, locate

    plain = resolved_config()
    assert plain["model"]["chat_template_kwargs"] == {}  # the schema's default: the template as it is
    assert "chat_template_kwargs" not in format_settings(plain)  # so the folders of before stay
    options = resolved_config({"model": {"chat_template_kwargs": {"enable_thinking": False}}})
    assert format_settings(options)["chat_template_kwargs"] == {"enable_thinking": False}
    before, after = locate("e", plain), locate("e", options)
    assert after.formatted != before.formatted and after.preprocessed == before.preprocessed
