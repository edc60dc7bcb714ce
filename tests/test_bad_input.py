"""Bad input, class by class (issue 21): each rule is tested from its general statement, over every
key or shape it covers, not only the examples that found it. Every refusal is one ConfigError at
load naming the key, file or value at fault."""

import json
import math
import os
from pathlib import Path

import pytest
from helpers import REPO, sample_rows

from workflow_scripts import checks, layout, trainer_fields
from workflow_scripts.config import load_schema
from workflow_scripts.data import sources
from workflow_scripts.data.download_dataset import load_local
from workflow_scripts.data.streams import Progress
from workflow_scripts.errors import ConfigError
from workflow_scripts.layout import COMPARE_ONLY  # noqa: F401
from workflow_scripts.sweeps.points import expand, point_names  # noqa: F401

TOKEN = "hf_" + "Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2"


def write_jsonl(path: Path, n: int, start: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sample_rows(start + n)[start:]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- 1. a secret inside a longer value

SECRET_PLACES = [
    (
        {"messages_format": {"messages_format": {"system_prompt": "You help. Key: {s} - use it."}}},
        "system_prompt",
    ),
    (
        {
            "messages_format": {
                "messages_format": {
                    "messages": [
                        {"role": "user", "content": "{{question}} auth={s}"},
                        {"role": "assistant", "content": "{{response}}"},
                    ]
                }
            }
        },
        "messages[0].content",
    ),
    ({"messages_format": {"metadata_columns": ["question_type", "col:{s}"]}}, "metadata_columns[1]"),
    ({"wandb": {"project": "proj-{s}"}}, "wandb.project"),
    ({"filters": {"answer_regex": "^(?!{s}).*"}}, "filters.answer_regex"),
    ({"model": {"revision": "main-{s}"}}, "model.revision"),  # *revision is exempt from the 40-hex rule only
    (
        {"messages_format": {"training_columns": {"q-{s}": "Q", "response": "Response"}}},
        "a key of messages_format.training_columns",
    ),
    ({"sweep": {"name": "s", "grid": {"wandb.project": ["a", "b {s}"]}}}, "sweep.grid"),
]


def fill(value, secret: str):
    if isinstance(value, dict):
        return {fill(k, secret): fill(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, secret) for v in value]
    return (
        value.replace("{s}", secret).replace("{{", "{").replace("}}", "}")
        if isinstance(value, str)
        else value
    )


@pytest.mark.parametrize("override, where", SECRET_PLACES)
@pytest.mark.parametrize("variable", ["HF_TOKEN", "WANDB_API_KEY", "HUGGING_FACE_HUB_TOKEN", None])
def test_a_secret_anywhere_inside_a_key_or_value_is_refused_without_echoing_it(
    resolved_config, monkeypatch, override, where, variable
):
    # an environment secret of any shape, or (variable None) a value shaped like a credential
    secret = "plain-words-secret-42" if variable else TOKEN
    for name in ("HF_TOKEN", "WANDB_API_KEY", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    if variable:
        monkeypatch.setenv(variable, secret)
    with pytest.raises(ConfigError) as err:
        resolved_config(fill(override, secret))
    assert where in str(err.value) and "secret" in str(err.value)
    assert secret not in str(err.value)


@pytest.mark.parametrize(
    "text",
    ["sk-" + "a" * 30, "wandb_v1_" + "b" * 30, "Bearer " + TOKEN, f"token={TOKEN};"],
)
def test_credential_shapes_inside_text_are_refused(resolved_config, text):
    with pytest.raises(ConfigError, match="system_prompt: looks like a secret"):
        resolved_config({"messages_format": {"messages_format": {"system_prompt": f"Hello {text} bye"}}})


def test_text_that_only_resembles_a_credential_passes(resolved_config, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "abc")  # shorter than a maskable secret: not searched inside text
    sha = "0123456789abcdef" * 2 + "01234567"
    config = resolved_config(
        {
            "model": {"revision": sha},
            "messages_format": {
                "messages_format": {"system_prompt": f"task-list, my_hf_thing, abcdef {sha}"}
            },
        }
    )
    assert config["model"]["revision"] == sha


def test_a_short_placeholder_secret_does_not_refuse_ordinary_config(resolved_config, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "test")  # a CI placeholder: the split named `test` is not a secret
    assert resolved_config({"dataset": {"split": {"test": 0.05}}})["dataset"]["split"]["test"] == 0.05


def test_sweep_lists_are_judged_by_the_key_they_belong_to(resolved_config):
    sha = "0123456789abcdef" * 2 + "01234567"  # a commit hash is a revision, also as a sweep value
    resolved_config({"sweep": {"name": "s", "grid": {"model.revision": [sha, None]}}})
    resolved_config(
        {"sweep": {"name": "s", "samples": {"n": 1, "space": {"model.revision": {"choice": [sha]}}}}}
    )
    with pytest.raises(ConfigError, match=r"wandb\.api_key\[0\]: looks like a secret"):
        resolved_config({"wandb": {"api_key": ["not-shaped-like-a-token"]}})


# ---------------------------------------------------------------- 2. non-finite numbers


def number_keys(schema: dict, path: str = ""):
    """Every key the schema types as a number (not only integer)."""
    for key, sub in (schema.get("properties") or {}).items():
        dotted = f"{path}.{key}" if path else key
        types = sub.get("type", [])
        types = [types] if isinstance(types, str) else types
        if "number" in types:
            yield dotted
        yield from number_keys(sub, dotted)


def nested(dotted: str, value) -> dict:
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


@pytest.mark.parametrize("key", sorted(set(number_keys(load_schema()))))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_number_must_be_finite(resolved_config, key, value):
    with pytest.raises(ConfigError, match=f"{key}: .*finite"):
        resolved_config(nested(key, value))


@pytest.mark.parametrize(
    "override, key",
    [
        (
            {"training": {"weight_decay": math.nan}},
            "training.weight_decay",
        ),  # a TRL field the schema does not list
        ({"training": {"max_grad_norm": math.inf}}, "training.max_grad_norm"),
        ({"sweep": {"name": "s", "grid": {"training.learning_rate": [0.001, math.nan]}}}, "sweep.grid"),
    ],
)
def test_non_finite_passed_through_and_swept_values_are_refused(resolved_config, override, key):
    with pytest.raises(ConfigError, match=f"{key}.*finite"):
        resolved_config(override)


def test_nan_from_the_command_line_is_refused(resolved_config):
    # --config 'dataset={split: {train: nan}}' arrives as text and is coerced to a float
    with pytest.raises(ConfigError, match="dataset.split.train: nan is not a finite number"):
        resolved_config({"dataset": {"split": {"train": "nan"}}})


# ---------------------------------------------------------------- 3. names a filesystem cannot hold


@pytest.mark.parametrize(
    "section",
    [["experiment"], ["model", "name"], ["export", "name"], ["sweep", "name"]],
)
def test_every_given_name_has_a_length_limit(resolved_config, section):
    def override(n):
        extra = {"sweep": {"grid": {"peft.r": [4]}}} if section[0] == "sweep" else {}
        value = nested(".".join(section), "n" * n)
        for k, v in extra.items():
            value[k] = {**v, **value[k]}
        return value

    resolved_config(override(checks.NAME_MAX_CHARS))
    with pytest.raises(ConfigError, match=f"{'.'.join(section)}: .* at most {checks.NAME_MAX_CHARS}"):
        resolved_config(override(checks.NAME_MAX_CHARS + 1))


@pytest.mark.parametrize("name", ["shared", "sweeps", "Shared", "SWEEPS"])
def test_folders_of_the_workflow_are_not_experiment_names(resolved_config, name):
    with pytest.raises(ConfigError, match="experiment: .* is a folder the workflow uses"):
        resolved_config({"experiment": name})


@pytest.mark.parametrize(
    "values",
    [
        ["a" * 300, "a" * 299 + "b"],  # long values sharing a long prefix
        [{"x": "y" * 500}, {"x": "y" * 499}],  # long structured values
    ],
)
def test_sweep_point_names_stay_short_and_distinct_whatever_the_values(values):
    names = point_names([{"messages_format.messages_format.system_prompt": v} for v in values])
    assert len(set(names)) == len(names)
    assert all(len(n) <= layout.COMPONENT_MAX_CHARS for n in names)
    many = {f"training.k{i}": "v" * 60 for i in range(20)}  # many keys
    (name,) = point_names([many])
    assert len(name) <= layout.COMPONENT_MAX_CHARS
    assert point_names([many]) == [name]  # a function of the point alone


def test_a_long_prompt_sweep_lays_out_within_the_limits(resolved_config):
    config = resolved_config(
        {
            "sweep": {
                "name": "long",
                "grid": {"messages_format.messages_format.system_prompt": ["p" * 300, "q" * 300]},
            }
        }
    )
    for exp in expand(config):
        paths = [exp.root, *exp.artifacts()["shared"].values()]
        assert all(len(part) <= layout.COMPONENT_MAX_CHARS for p in paths for part in Path(p).parts)


def test_derived_names_are_cut(tmp_path, resolved_config, tiny_model_dir):
    deep = tmp_path / ("m" * 200)
    deep.symlink_to(tiny_model_dir)
    data = write_jsonl(tmp_path / ("d" * 240 + ".jsonl"), 300)
    (exp,) = expand(resolved_config({"model": {"id": str(deep)}, "dataset": {"id": str(data)}}))
    for path in [exp.root, *exp.artifacts()["shared"].values()]:
        assert all(len(part) <= layout.COMPONENT_MAX_CHARS for part in Path(path).parts), path


# ---------------------------------------------------------------- 4. keys the training stage manages


def test_every_managed_key_is_a_trainer_field():
    assert set(trainer_fields.MANAGED_TRAINING_KEYS) <= trainer_fields.allowed_keys()["training"]


@pytest.mark.parametrize("key", sorted(trainer_fields.MANAGED_TRAINING_KEYS))
def test_managed_keys_are_refused_at_load_and_as_sweep_axes(resolved_config, key):
    from workflow_scripts.trainer_fields import load

    spec = load()["training"][key]
    value = {"boolean": True, "string": "x", "integer": 2, "object": {}, "null": None}[
        next(t for t in spec["types"] if t != "null")
    ]
    with pytest.raises(ConfigError, match=f"training.{key}: set by snaketune itself"):
        resolved_config({"training": {key: value}})
    with pytest.raises(ConfigError, match=f"sweep point 0 .*training.{key}: set by snaketune itself"):
        expand(resolved_config({"sweep": {"name": "s", "grid": {f"training.{key}": [value]}}}))


# ---------------------------------------------------------------- 5. symlinked split folders and files


def test_symlinked_split_folders_and_files_are_followed_and_recorded(tmp_path):
    holdout = tmp_path / "elsewhere" / "holdout"
    write_jsonl(holdout / "part-0.jsonl", 7, start=50)
    write_jsonl(tmp_path / "elsewhere" / "val.jsonl", 5, start=60)
    ds = tmp_path / "ds"
    (tmp_path / "scratch").mkdir()
    write_jsonl(ds / "train.jsonl", 30)
    (ds / "test").symlink_to(holdout, target_is_directory=True)
    (ds / "validation.jsonl").symlink_to(tmp_path / "elsewhere" / "val.jsonl")
    (ds / "loop").symlink_to(ds, target_is_directory=True)  # a link back up: followed once
    found, how = sources.local_split_files({"id": str(ds), "data_files": None})
    assert how == "folder" and set(found) == {"train", "validation", "test"}
    spills, record = load_local({"id": str(ds), "data_files": None}, tmp_path / "scratch", Progress("read"))
    assert spills["test"].rows == 7 and spills["validation"].rows == 5
    (test_file,) = record["files"]["test"]
    assert test_file["resolved"] == os.path.realpath(holdout / "part-0.jsonl")
    assert "resolved" not in record["files"]["train"][0]


def test_a_broken_link_is_an_error_never_skipped(tmp_path):
    ds = tmp_path / "ds"
    write_jsonl(ds / "train.jsonl", 30)
    (ds / "test.jsonl").symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(sources.SourceError, match="test.jsonl is a broken link"):
        sources.local_split_files({"id": str(ds), "data_files": None})
    (ds / "test.jsonl").unlink()
    (ds / "holdout").symlink_to(tmp_path / "unmounted")  # no split name, no data suffix: still an error
    with pytest.raises(sources.SourceError, match="holdout is a broken link"):
        sources.local_split_files({"id": str(ds), "data_files": None})


def test_a_folder_cannot_feed_one_file_to_two_splits_through_links(tmp_path):
    ds = tmp_path / "ds"
    write_jsonl(ds / "train.jsonl", 30)
    (ds / "test.jsonl").symlink_to(ds / "train.jsonl")  # the test split would be the training data
    with pytest.raises(
        sources.SourceError, match="dataset.id: .*train.jsonl .*test.jsonl.* read for both test and train"
    ):
        sources.local_split_files({"id": str(ds), "data_files": None})
    (ds / "test.jsonl").unlink()
    write_jsonl(tmp_path / "shared" / "part.jsonl", 5)
    (ds / "validation").symlink_to(tmp_path / "shared", target_is_directory=True)
    (ds / "test").symlink_to(tmp_path / "shared", target_is_directory=True)  # a second link: not skipped
    with pytest.raises(sources.SourceError, match="read for both"):
        sources.local_split_files({"id": str(ds), "data_files": None})


@pytest.mark.parametrize("name", ["test.tsv", "validation.jsonl.gz", "holdout/test.txt"])
def test_a_split_file_in_an_unread_format_is_an_error_never_skipped(tmp_path, name):
    ds = tmp_path / "ds"
    write_jsonl(ds / "train.jsonl", 30)
    (ds / name).parent.mkdir(parents=True, exist_ok=True)
    (ds / name).write_text("x")
    with pytest.raises(sources.SourceError, match="names a split but is not a json"):
        sources.local_split_files({"id": str(ds), "data_files": None})


def test_a_dataset_under_a_hidden_folder_is_found(tmp_path):
    ds = tmp_path / ".cache" / "ds"
    write_jsonl(ds / "train.jsonl", 30)
    found, _ = sources.local_split_files({"id": str(ds), "data_files": None})
    assert found == {"train": [str(ds / "train.jsonl")]}


# ---------------------------------------------------------------- 6. globs and paths outside the folder


def test_no_pattern_or_folder_walks_the_filesystem(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_SCAN_ENTRIES", 50)
    for i in range(60):
        (tmp_path / "big" / f"d{i}").mkdir(parents=True)
    write_jsonl(tmp_path / "big" / "train.jsonl", 5)
    for cfg in (
        {"id": str(tmp_path / "big"), "data_files": None},
        {"id": str(tmp_path), "data_files": {"train": "**/*.jsonl"}},
        {"id": "x.jsonl", "data_files": {"train": str(tmp_path / "big" / "*" / "*.jsonl")}},
    ):
        with pytest.raises(sources.SourceError, match="visits more than 50 entries"):
            sources.local_split_files(cfg)


def test_a_root_glob_is_refused_in_seconds(resolved_config):
    import time

    start = time.perf_counter()
    with pytest.raises(
        ConfigError, match="dataset.data_files.train: the pattern '/\\*\\*/\\*.jsonl' visits more"
    ):
        resolved_config(
            {"dataset": {"id": str(REPO / "data" / "sample"), "data_files": {"train": "/**/*.jsonl"}}}
        )
    assert time.perf_counter() - start < 30


def test_paths_are_normalised_and_a_file_feeds_one_split_however_spelled(tmp_path):
    ds = tmp_path / "ds"
    write_jsonl(ds / "a.jsonl", 20)
    write_jsonl(tmp_path / "outside" / "held.jsonl", 5)
    found, _ = sources.local_split_files(
        {"id": str(ds), "data_files": {"train": "./sub/../a.jsonl", "test": "../outside/held.jsonl"}}
    )
    assert found == {"train": [str(ds / "a.jsonl")], "test": [str(tmp_path / "outside" / "held.jsonl")]}
    (ds / "alias.jsonl").symlink_to(ds / "a.jsonl")
    for test in ("x/../a.jsonl", "alias.jsonl"):
        with pytest.raises(sources.SourceError, match="read for both train and test"):
            sources.local_split_files({"id": str(ds), "data_files": {"train": "a.jsonl", "test": test}})


def test_globs_follow_the_glob_module_rules(tmp_path):
    ds = tmp_path / "ds"
    for rel in ("p1.jsonl", "sub/p2.jsonl", "sub/deep/p3.jsonl", "q1.jsonl", ".hidden/p4.jsonl"):
        write_jsonl(ds / rel, 2)

    def names(pattern):
        found, _ = sources.local_split_files({"id": str(ds), "data_files": {"train": pattern}})
        return sorted(str(Path(f).relative_to(ds)) for f in found["train"])

    assert names("p*.jsonl") == ["p1.jsonl"]
    assert names("*/p*.jsonl") == ["sub/p2.jsonl"]
    assert names("**/p*.jsonl") == ["p1.jsonl", "sub/deep/p3.jsonl", "sub/p2.jsonl"]
    assert names("[pq]1.jsonl") == ["p1.jsonl", "q1.jsonl"]
    assert names("[!p]?.jsonl") == ["q1.jsonl"]
    with pytest.raises(sources.SourceError, match="matches no file"):
        names("nothing*.jsonl")


@pytest.mark.parametrize("pattern", ["/abs/train.jsonl", "../up.jsonl", "a/../../up.jsonl", "~/x.jsonl"])
def test_hub_data_files_stay_inside_the_repository(resolved_config, pattern):
    with pytest.raises(ConfigError, match="dataset.data_files.train: .* outside the Hub repository"):
        resolved_config({"dataset": {"id": "someone/data", "data_files": {"train": pattern}}})


# ---------------------------------------------------------------- 7. generation within the context window


def test_max_new_tokens_beyond_a_local_models_window_is_refused(resolved_config, tiny_model_dir):
    window = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    model = {"id": str(tiny_model_dir), "name": "tiny"}
    resolved_config({"model": model, "evaluation": {"max_new_tokens": window - 1}})
    with pytest.raises(
        ConfigError, match=f"evaluation.max_new_tokens: {window} does not fit .*{window} tokens"
    ):
        resolved_config({"model": model, "evaluation": {"max_new_tokens": window}})


def test_the_generator_refuses_prompt_plus_new_tokens_beyond_the_window(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from workflow_scripts.evaluation.generate import check_context_window
    from workflow_scripts.models.families import family_of
    from workflow_scripts.stage import StageError

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    window = model.config.max_position_embeddings
    family = family_of(model.config)
    check_context_window(model, family, [10, window - 100], 100)
    with pytest.raises(
        StageError, match=f"evaluation.max_new_tokens: 101 .*\\({window - 100} tokens\\).* 100 or less"
    ):
        check_context_window(model, family, [10, window - 100], 101)


# ---------------------------------------------------------------- 8. checked at load, not later


@pytest.mark.parametrize("key", ["model.id", "evaluation.bertscore_model"])
@pytest.mark.parametrize(
    "value", ["./missing", "/no/such/model", "~/no-such-model-dir", "a/b/c", "missing.gguf"]
)
def test_a_model_path_that_does_not_exist_fails_at_load(resolved_config, key, value):
    with pytest.raises(ConfigError, match=f"{key}: local path {value} does not exist"):
        resolved_config(nested(key, value))


def test_a_hub_id_is_not_taken_for_a_missing_path(resolved_config):
    assert resolved_config({"model": {"id": "someone/model"}})["model"]["id"] == "someone/model"


@pytest.mark.parametrize("key", ["model.id", "dataset.id", "evaluation.bertscore_model"])
@pytest.mark.parametrize("value", ["someone/..", "bad name/model", "-lead/x", "a" * 97])
def test_a_malformed_hub_id_fails_at_load(resolved_config, key, value):
    with pytest.raises(ConfigError, match=f"{key}: .* is neither a local path nor a Hub id"):
        resolved_config(nested(key, value))


def test_a_local_model_must_be_a_model(resolved_config, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ConfigError, match="model.id: folder .* has no config.json"):
        resolved_config({"model": {"id": str(tmp_path / "empty")}})
    with pytest.raises(ConfigError, match="model.id: .* is a file but not a .gguf file"):
        resolved_config({"model": {"id": str(tmp_path / "weights.bin")}})


def test_a_missing_accelerate_config_fails_at_load(resolved_config, tmp_path):
    with pytest.raises(
        ConfigError, match="training.accelerate_config: file .*fsdp-missing.yaml does not exist"
    ):
        resolved_config({"training": {"accelerate_config": str(tmp_path / "fsdp-missing.yaml")}})
    (tmp_path / "fsdp.yaml").write_text("distributed_type: FSDP\n")
    config = resolved_config({"training": {"accelerate_config": str(tmp_path / "fsdp.yaml")}})
    assert config["training"]["accelerate_config"] == str(tmp_path / "fsdp.yaml")


@pytest.mark.parametrize(
    "split, message",
    [
        (
            {"train": 1.0, "validation": 0.0, "test": 0.0},
            "dataset.split.validation: 0.0 leaves the validation split empty",
        ),
        (
            {"train": 0.0, "validation": 0.5, "test": 0.5},
            "dataset.split.train: 0.0 leaves the train split empty",
        ),
        (
            {"train": 0.98, "validation": 0.01, "test": 0.01},
            "dataset.split.validation: 0.01 of the 20 train rows",
        ),
    ],
)
def test_ratios_that_leave_a_carved_split_empty_fail_at_load(resolved_config, tmp_path, split, message):
    data = write_jsonl(tmp_path / "small.jsonl", 20)
    with pytest.raises(ConfigError, match=message):
        resolved_config({"dataset": {"id": str(data), "split": split}})


def test_a_zero_ratio_is_fine_for_a_split_that_comes_from_files(resolved_config, tmp_path):
    """The ratios only carve the splits the files lack: with a file for every split, 0.0 for
    validation and test is accepted at load, and download_dataset gives each split its own file's
    rows, carving none out of train."""
    from workflow_scripts.data.download_dataset import load_local, make_splits
    from workflow_scripts.data.streams import Progress

    ds = tmp_path / "ds"
    files = {
        "train": write_jsonl(ds / "train.jsonl", 20),
        "validation": write_jsonl(ds / "validation.jsonl", 5),
        "test": write_jsonl(ds / "test.jsonl", 5),
    }
    split = {"train": 1.0, "validation": 0.0, "test": 0.0}
    dataset = resolved_config({"dataset": {"id": str(ds), "split": split}})["dataset"]
    assert {s: dataset["split"][s] for s in split} == split
    # what download_dataset does with it (load_local, then make_splits)
    (tmp_path / "scratch").mkdir()
    spills, record = load_local(dataset, tmp_path / "scratch", Progress("read"))
    assert record["found_by"] == "folder"
    assert {s: [e["path"] for e in entries] for s, entries in record["files"].items()} == {
        s: [str(f)] for s, f in files.items()
    }
    splits, carving = make_splits(spills, dataset)
    assert {s: len(rows) for s, (_, rows) in splits.items()} == {"train": 20, "validation": 5, "test": 5}
    assert carving["carved_from_train"] == {}


def test_load_time_carving_predicts_download_dataset(tmp_path):
    from workflow_scripts.data.download_dataset import Spill, make_splits

    for n in (7, 20, 99):
        ratios = {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 1}
        spill = Spill(tmp_path, f"train{n}")
        spill.add([{"a": str(i)} for i in range(n)])
        predicted = sources.carve_counts(n, ratios, ["validation", "test"])
        if 0 in predicted.values():
            continue
        splits, _ = make_splits({"train": spill}, {"split": ratios, "max_rows": None})
        assert {s: len(rows) for s, (_, rows) in splits.items()} == predicted


def test_a_split_given_no_files_is_refused_at_load(resolved_config):
    with pytest.raises(ConfigError, match=r"dataset\.data_files\.validation: \[\] should be non-empty"):
        resolved_config({"dataset": {"data_files": {"train": "*.jsonl", "validation": []}}})


@pytest.mark.parametrize("key", ["model.id", "dataset.id", "training.accelerate_config"])
def test_a_home_folder_of_an_unknown_user_is_one_line(resolved_config, key):
    with pytest.raises(ConfigError, match=f"{key}: '~nosuchuser12/x' starts with ~ but names no home folder"):
        resolved_config(nested(key, "~nosuchuser12/x"))


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_local_model_with_a_broken_config_json_is_one_line(resolved_config, tmp_path, content):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(content)
    with pytest.raises(
        ConfigError, match=r"model\.id: .*config\.json (cannot be read as JSON|is not a JSON object)"
    ):
        resolved_config({"model": {"id": str(tmp_path / "m")}})
