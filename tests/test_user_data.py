"""Users' own data, laid out their way: split files, their own columns, messy rows, text kept as written."""

import json
import os

import pandas as pd
import pytest
import yaml
from helpers import copy_run, new_workflow, planned_rules, preprocessed_rows, sample_rows, smk, write_config

from workflow_scripts.config import coerce_cli_strings
from workflow_scripts.data import download_dataset
from workflow_scripts.data.sources import SourceError, local_split_files, read_rows, split_of
from workflow_scripts.errors import ConfigError
from workflow_scripts.stage import Job, StageError

SPLITS = ("train", "validation", "test")
Q = "Open-ended Verifiable Question"


def dataset_cfg(path, **kw):
    cfg = {"id": str(path), "config": None, "revision": None, "max_rows": None, "data_files": None}
    cfg.update(split_names=None, split={"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 1})
    cfg.update(kw)
    return cfg


def download(dataset: dict, out: dict) -> dict:
    """The download_dataset rule's job: ``out`` holds a path per split and ``sources``."""
    return download_dataset.run(Job(output=out, params={"dataset": dataset}))


def raw_outputs(tmp_path):
    out = {s: str(tmp_path / "raw" / f"{s}.parquet") for s in SPLITS}
    return {**out, "sources": str(tmp_path / "raw" / "sources.json")}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def split_folder(folder, names=("mydata_train.jsonl", "mydata_validation.jsonl", "mydata_test.jsonl")):
    rows = sample_rows(100)
    for name, chunk in zip(names, (rows[:70], rows[70:80], rows[80:]), strict=True):
        write_jsonl(folder / name, chunk)
    return rows


# --- which file feeds which split -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, split",
    [
        ("finqa_train.jsonl", "train"),
        ("train.jsonl", "train"),
        ("training-00001.parquet", "train"),
        ("finqa_validation.jsonl", "validation"),
        ("validation_set.jsonl", "validation"),
        ("dev.csv", "validation"),
        ("my.val.json", "validation"),
        ("dev/part-0.jsonl", "validation"),
        ("test_2024.jsonl", "test"),
        ("eval.jsonl", "test"),
        ("holdout/evaluation.jsonl", "test"),
        ("contest.jsonl", None),  # "test" inside a word is not a split name
        ("trainee_notes.jsonl", None),
        ("data.jsonl", None),
        ("retrieval.jsonl", None),
    ],
)
def test_split_names_follow_the_datasets_vocabulary(name, split):
    assert split_of(name) == split


def test_split_keywords_match_the_datasets_library():
    from datasets import data_files

    from workflow_scripts.data import sources

    assert {str(k): v for k, v in data_files.SPLIT_KEYWORDS.items()} == sources.SPLIT_KEYWORDS
    assert data_files.NON_WORDS_CHARS == sources.NON_WORDS_CHARS


def test_a_file_naming_two_splits_is_an_error():
    with pytest.raises(SourceError, match="train_test.jsonl.*names several splits"):
        split_of("train_test.jsonl")


def test_split_files_give_exactly_their_rows_and_a_record(tmp_path):
    folder = tmp_path / "mydata"
    rows = split_folder(folder)
    counts = download(dataset_cfg(folder), raw_outputs(tmp_path))
    assert counts == {"train": 70, "validation": 10, "test": 20}
    frames = {s: pd.read_parquet(tmp_path / "raw" / f"{s}.parquet") for s in SPLITS}
    assert set(frames["test"][Q]) == {r[Q] for r in rows[80:]}
    assert set(frames["validation"][Q]) == {r[Q] for r in rows[70:80]}
    assert set(frames["train"][Q]) == {r[Q] for r in rows[:70]}
    record = json.loads((tmp_path / "raw" / "sources.json").read_text())
    assert record["found_by"] == "folder" and record["carved_from_train"] == {}
    assert [f["path"] for f in record["files"]["test"]] == [str(folder / "mydata_test.jsonl")]
    assert record["files"]["test"][0]["rows"] == 20 and len(record["files"]["test"][0]["sha256"]) == 64


def test_a_missing_split_is_carved_from_train_only(tmp_path):
    folder = tmp_path / "d"
    rows = sample_rows(100)
    write_jsonl(folder / "finqa_train.jsonl", rows[:80])
    write_jsonl(folder / "test_2024.jsonl", rows[80:])
    counts = download(dataset_cfg(folder), raw_outputs(tmp_path))
    assert counts == {"train": 71, "validation": 9, "test": 20}  # 80 * 0.1 / 0.9 carved
    test = pd.read_parquet(tmp_path / "raw" / "test.parquet")
    assert set(test[Q]) == {r[Q] for r in rows[80:]}, "a split from a file is never merged into another"
    record = json.loads((tmp_path / "raw" / "sources.json").read_text())
    assert record["carved_from_train"] == {"validation": {"rows": 9, "share_of_train_pool": 0.111111}}
    assert record["seed"] == 1


def test_an_unrecognised_file_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "d"
    split_folder(folder)
    write_jsonl(folder / "extra_rows.jsonl", sample_rows(3))
    with pytest.raises(SourceError, match=r"(?s)name no split .*: extra_rows.jsonl;.*data_files"):
        local_split_files(dataset_cfg(folder))


def test_data_files_name_the_splits_explicitly(tmp_path):
    folder = tmp_path / "d"
    rows = sample_rows(100)
    write_jsonl(folder / "part_a.jsonl", rows[:40])
    write_jsonl(folder / "part_b.jsonl", rows[40:70])
    write_jsonl(folder / "holdout.jsonl", rows[70:])
    cfg = dataset_cfg(folder, data_files={"train": "part_*.jsonl", "test": "holdout.jsonl"})
    counts = download(cfg, raw_outputs(tmp_path))
    assert counts["test"] == 30 and counts["train"] + counts["validation"] == 70
    with pytest.raises(SourceError, match="dataset.data_files.test: 'nope.jsonl' matches no file"):
        local_split_files(dataset_cfg(folder, data_files={"train": "part_a.jsonl", "test": "nope.jsonl"}))
    both = {"train": "*.jsonl", "test": "holdout.jsonl"}
    with pytest.raises(SourceError, match="holdout.jsonl is read for both train and test"):
        local_split_files(dataset_cfg(folder, data_files=both))


# --- text exactly as written -----------------------------------------------------------------


def test_cells_are_read_as_written_in_every_format(tmp_path):
    lines = [
        '{"q": "a", "answer": 980, "rate": 1.50, "ok": true}',
        '{"q": "b", "answer": null, "rate": 2.0, "ok": false}',
        '{"q": "c", "answer": 2530, "rate": 0.10, "ok": null, "extra": [1, 2]}',
    ]
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    rows = read_rows(tmp_path / "x.jsonl")
    assert [r["answer"] for r in rows] == ["980", None, "2530"]
    assert [r["rate"] for r in rows] == ["1.50", "2.0", "0.10"]
    assert rows[0]["ok"] == "true" and rows[2]["extra"] == "[1, 2]"
    (tmp_path / "x.csv").write_text("q,answer,rate\na,980,1.50\nb,,NA\nc,2530,0.10\n")
    rows = read_rows(tmp_path / "x.csv")
    assert [r["answer"] for r in rows] == ["980", None, "2530"]
    assert [r["rate"] for r in rows] == ["1.50", "NA", "0.10"]
    pd.DataFrame({"q": ["a", "b"], "answer": pd.array([980, None], dtype="Int64")}).to_parquet(
        tmp_path / "x.parquet"
    )
    assert [r["answer"] for r in read_rows(tmp_path / "x.parquet")] == ["980", None]


def test_an_integer_column_with_a_null_stays_integer_text_through_preprocess(tmp_path, resolved_config):
    from workflow_scripts.data import preprocess_dataset

    rows = [{"Q": f"What is item {i} worth in total?", "A": (None if i == 3 else 900 + i)} for i in range(60)]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    download(dataset_cfg(tmp_path / "qa.jsonl"), raw_outputs(tmp_path))
    cfg = resolved_config(QA_CONFIG)
    out = {s: str(tmp_path / "pre" / f"{s}.parquet") for s in SPLITS}
    raw = {s: str(tmp_path / "raw" / f"{s}.parquet") for s in SPLITS}
    job = Job(
        input=raw,
        output={**out, "report": str(tmp_path / "r.json")},
        params={"messages_format": cfg["messages_format"], "filters": cfg["filters"]},
    )
    preprocess_dataset.run(job)
    targets = [r["messages"][-1]["content"] for r in preprocessed_rows(out["train"])]
    references = [r["reference"] for r in preprocessed_rows(out["test"])]
    assert all("." not in t for t in targets + references), (targets, references)


# --- messy input ends in one clear error -------------------------------------------------------


def test_messy_files_fail_naming_the_file_and_row(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"q": "ok"}\n{"q": "caf\xe9"}\n')
    with pytest.raises(StageError, match=r"latin.jsonl: not UTF-8 \(byte 0xe9 on line 2\)"):
        download(dataset_cfg(latin), raw_outputs(tmp_path))
    csv = tmp_path / "latin.csv"
    csv.write_bytes(b"q,a\nna\xefve,1\n")
    with pytest.raises(StageError, match=r"latin.csv: not UTF-8 \(byte 0xef on line 2\)"):
        download(dataset_cfg(csv), raw_outputs(tmp_path))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(StageError, match="empty.jsonl: the file is empty"):
        download(dataset_cfg(empty), raw_outputs(tmp_path))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"q": 1}\n{"q": 2\n')
    with pytest.raises(StageError, match="broken.jsonl: line 2 is not valid JSON"):
        download(dataset_cfg(broken), raw_outputs(tmp_path))
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text('{"q": 1}\n"just text"\n')
    with pytest.raises(StageError, match="scalar.jsonl: line 2 is a str, not an object of columns"):
        download(dataset_cfg(scalar), raw_outputs(tmp_path))
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"filters": {"answer_regex": "([unclosed"}},
            "filters.answer_regex: '([unclosed' is not a valid regex",
        ),
        (
            {
                "messages_format": {
                    "messages_format": {
                        "messages": [
                            {"role": "system", "content": "{question}"},
                            {"role": "assistant", "content": "{response}"},
                        ]
                    }
                }
            },
            "no user message",
        ),
        (
            {
                "messages_format": {
                    "messages_format": {
                        "messages": [
                            {"role": "user", "content": "Answer the question."},
                            {"role": "assistant", "content": "{response}"},
                        ]
                    }
                }
            },
            "messages[0].content: the user message has no placeholder of a column",
        ),
    ],
)
def test_bad_templates_and_regexes_fail_at_load(resolved_config, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        resolved_config(override)


def test_null_on_the_command_line_means_null():
    schema = {"type": "object", "properties": {"answer_regex": {"type": ["string", "null"]}}}
    assert coerce_cli_strings({"answer_regex": "null"}, schema) == {"answer_regex": None}
    assert coerce_cli_strings({"answer_regex": "~"}, schema) == {"answer_regex": None}
    assert coerce_cli_strings({"answer_regex": "^[0-9]"}, schema) == {"answer_regex": "^[0-9]"}


# --- through real Snakemake: config merging, inputs, load-time errors ---------------------------

QA_CONFIG = {
    "messages_format": {
        "training_columns": {"q": "Q", "a": "A"},
        "messages_format": {
            "system_prompt": None,
            "messages": [{"role": "user", "content": "{q}"}, {"role": "assistant", "content": "{a}"}],
        },
        "evaluate_columns": {"query": "Q", "response": "A"},
        "metadata_columns": [],
    },
    "evaluation": {"type_column": None},
}


def qa_files(workflow_copy, tiny_model_dir):
    """A user's Q/A dataset (no chain of thought) split into files their way, and qa.yaml."""
    folder = workflow_copy / "userdata"
    rows = [{"Q": r[Q], "A": r["Response"]} for r in sample_rows(120)]
    write_jsonl(folder / "qa_train.jsonl", rows[:90])
    write_jsonl(folder / "qa_validation.jsonl", rows[90:100])
    write_jsonl(folder / "qa_test.jsonl", rows[100:])
    cfg = write_config(
        workflow_copy / "qa.yaml",
        {
            **QA_CONFIG,
            "experiment": "qa",
            "model": {"id": str(tiny_model_dir), "name": "tiny"},
            "dataset": {"id": "userdata"},
            "training": {"max_steps": 4, "eval_steps": 4, "save_steps": 4, "per_device_train_batch_size": 4},
            "evaluation": {"type_column": None, "max_examples": 6, "max_new_tokens": 8, "batch_size": 6},
            "wandb": {"mode": "disabled"},
            "resources": {"threads": 1},  # independent stages run side by side on the 2 cores
        },
    )
    return workflow_copy, cfg, folder


@pytest.fixture
def qa_workflow(workflow_copy, tiny_model_dir):
    """A fresh workflow copy with the Q/A dataset (nothing run yet)."""
    return qa_files(workflow_copy, tiny_model_dir)


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, tiny_model_dir):
    """The Q/A workflow run to the end, once for this module; tests that change it take ``qa_done``."""
    wf, cfg, folder = qa_files(new_workflow(tmp_path_factory.mktemp("qa") / "wf"), tiny_model_dir)
    smk(wf, "--configfile", str(cfg))
    return wf, cfg, folder


@pytest.fixture
def qa_done(qa_run, tmp_path):
    """A copy of the finished Q/A run."""
    src, cfg, folder = qa_run
    wf = copy_run(src, tmp_path / "wf")
    return wf, wf / cfg.name, wf / folder.relative_to(src)


@pytest.mark.e2e
def test_qa_dataset_runs_through_configfile_to_the_end(qa_run):
    wf, cfg, _ = qa_run  # run to the end by the fixture
    res = wf / "results" / "qa"
    index = json.loads((res / "experiment.json").read_text())
    record = json.loads((wf / index["shared"]["dataset"] / "sources.json").read_text())
    assert record["rows"] == {"train": 90, "validation": 10, "test": 20}
    first = preprocessed_rows(wf / index["shared"]["preprocessed"] / "train.parquet")[0]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert json.loads((res / "evaluation" / "comparison.json").read_text())
    assert planned_rules(wf, "all", cfg) == set()


@pytest.mark.e2e
def test_editing_one_data_file_reruns_the_data_stages(qa_done):
    wf, cfg, folder = qa_done
    assert planned_rules(wf, "all", cfg) == set()
    test_file = folder / "qa_test.jsonl"
    test_file.write_text(
        test_file.read_text() + json.dumps({"Q": "What is 1 + 1 in total?", "A": "2"}) + "\n"
    )
    os.utime(test_file, (test_file.stat().st_atime + 5, test_file.stat().st_mtime + 5))
    assert "download_dataset" in planned_rules(wf, "format_dataset", cfg)


def test_an_unrecognised_file_fails_at_load_naming_it(qa_workflow):
    wf, cfg, folder = qa_workflow
    write_jsonl(folder / "notes.jsonl", [{"Q": "x", "A": "y"}])
    proc = smk(wf, "-n", "--configfile", str(cfg), check=False)
    assert proc.returncode != 0
    assert "notes.jsonl" in proc.stdout + proc.stderr and "data_files" in proc.stdout + proc.stderr
    assert not (wf / "results").exists()


@pytest.mark.e2e
def test_null_from_the_command_line_reaches_the_stage_as_null(qa_done):
    wf, cfg, _ = qa_done  # answer_regex defaults to null: the same preprocess folder, no new job
    smk(
        wf,
        "--until",
        "preprocess_dataset",
        "--configfile",
        str(cfg),
        "--config",
        "filters={answer_regex: null}",
    )
    (report_file,) = (wf / "results" / "shared" / "preprocessed").glob("*/report.json")
    report = json.loads(report_file.read_text())
    assert "answer_regex" not in report["train"]["dropped"]


def test_the_default_filters_do_not_follow_a_users_columns(qa_workflow):
    wf, cfg, _ = qa_workflow
    out = smk(wf, "-n", "--configfile", str(cfg))
    assert "filters.min_chars of the default config" in out.stdout + out.stderr
    own = write_config(wf / "own.yaml", {"filters": {"min_chars": {"q": 5}}})
    out = smk(wf, "-n", "--configfile", str(cfg), str(own))
    assert "filters.min_chars of the default config" not in out.stdout + out.stderr
    assert yaml.safe_load((wf / "config.yaml").read_text())["filters"]["min_chars"]  # the default has some
