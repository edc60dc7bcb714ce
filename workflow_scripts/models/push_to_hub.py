"""Opt-in: upload the deployment model, its model card, the evaluation and the GGUF files to the Hub.

The card is rewritten for the Hub here (workflow_scripts.models.model_card): merge runs before the
evaluation, so only now can it carry the base-vs-fine-tuned table and `model-index` results, the
dataset and the GGUF files. GGUF files are included when export_gguf has run for this very
deployment model (its report records the weights' hash). Workflow internals (Snakemake's
`.snakemake_timestamp`, temporary files: any name starting with a dot) are never uploaded.

Fails before any upload when `hub.repo_id` or HF_TOKEN is missing. `hub.dry_run` writes the card
and lists exactly what would be uploaded (path in the repo, size), and uploads nothing.
"""

import json
import logging
from pathlib import Path

from workflow_scripts.credentials import hf_token
from workflow_scripts.files import atomic_path, write_json
from workflow_scripts.models import model_card
from workflow_scripts.models.families import family_of
from workflow_scripts.stage import Job, StageError, snakemake_main
from workflow_scripts.sweeps.winner import subject

log = logging.getLogger("snaketune.push_to_hub")


def is_internal(relative: Path) -> bool:
    """Workflow bookkeeping, not part of the model: dot files (.snakemake_timestamp, temp files)."""
    return any(part.startswith(".") for part in relative.parts)


def exported_gguf(export_report: str | None, deployment_dir: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """(card rows, upload entries) of the verified GGUF files of this deployment model, if any."""
    if not export_report or not Path(export_report).is_file():
        return [], []
    from workflow_scripts.models.export_gguf import weights_sha256

    report = json.loads(Path(export_report).read_text())
    if not report.get("passed") or report.get("source_weights_sha256") != weights_sha256(deployment_dir):
        log.warning(
            "%s is not for the current deployment model; re-run export_gguf to publish GGUF files",
            export_report,
        )
        return [], []
    if "runtime" not in report:  # written before the files were checked in llama.cpp
        log.warning("%s predates the llama.cpp check; re-run export_gguf to publish GGUF files", export_report)
        return [], []
    rows, plan = [], []
    folder = Path(export_report).parent
    for outtype, f in report.get("files", {}).items():
        path = folder / f["file"]
        if not path.is_file():
            continue
        check = (
            f"in llama.cpp: mean KL {f['mean_kl']:.1e} from this model, greedy answers identical on "
            f"{f['greedy_identical']} test prompts"
        )
        rows.append({"file": f["file"], "outtype": outtype, "bytes": path.stat().st_size, "check": check})
        plan.append((str(path), f["file"]))
    if plan:
        plan.append((str(export_report), "export_report.json"))
    return rows, plan


def upload_plan(
    deployment_dir: str, card: str, evaluation_files: list[str], extra=()
) -> list[tuple[str, str]]:
    """(local path, path in the repo) of every file to upload: the model (its README.md replaced by
    ``card``), the evaluation JSONs, then ``extra`` (the GGUF files)."""
    root = Path(deployment_dir)
    plan = [(card, "README.md")]
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and not is_internal(relative) and relative.as_posix() != "README.md":
            plan.append((str(path), relative.as_posix()))
    plan += [(f, f"evaluation/{Path(f).name}") for f in evaluation_files]
    return plan + list(extra)


def base_license(base_model: str | None, token: str | None) -> str | None:
    """The base model's licence as its Hub card states it (only asked when really pushing)."""
    if not base_model:
        return None
    try:
        from huggingface_hub import HfApi

        data = HfApi(token=token).model_info(base_model).card_data
        return getattr(data, "license", None) if data else None
    except Exception as exc:  # the card is still valid without it
        log.warning("could not read the licence of %s from the Hub (%s)", base_model, type(exc).__name__)
        return None


def run(job: Job) -> dict:
    hub = dict(job.params.hub)
    repo_id = hub.get("repo_id")
    if not repo_id:
        raise StageError(
            "hub.repo_id: not set; pass --config hub.repo_id=<user>/<model> (nothing was uploaded)"
        )
    dry_run = bool(hub.get("dry_run"))
    token = None if dry_run else hf_token()
    if not dry_run and not token:
        raise StageError(
            "HF_TOKEN: not set in the environment or .env; it is needed to push (nothing was uploaded)"
        )
    chosen = subject(job)  # the experiment, or the sweep point acted on (workflow_scripts/sweeps/winner.py)
    deployment_dir = chosen.input.deployment_dir
    manifest = model_card.read_manifest(chosen.input.base_model_dir)
    origin = model_card.base_model_origin(manifest)
    gguf_rows, gguf_plan = exported_gguf(job.params.get("export_report"), deployment_dir)
    card_path = Path(deployment_dir) / "README.md"
    card = model_card.publish_card(
        card_path.read_text() if card_path.is_file() else "",
        repo_id=repo_id,
        family=family_of(deployment_dir),
        manifest=manifest,
        dataset_cfg=chosen.params.get("dataset"),
        comparison=json.loads(Path(chosen.input.comparison).read_text()),
        finetuned_eval=json.loads(Path(chosen.input.finetuned).read_text()),
        gguf=gguf_rows,
        license=None if (dry_run or origin["license"]) else base_license(origin["base_model"], token),
        sweep_point=chosen.acted_on,
    )
    with atomic_path(job.output.card) as tmp:
        tmp.write_text(card)
    evaluations = [chosen.input.base, chosen.input.finetuned, chosen.input.comparison]
    plan = upload_plan(deployment_dir, str(job.output.card), evaluations, gguf_plan)
    files = [{"path_in_repo": dest, "bytes": Path(src).stat().st_size} for src, dest in plan]
    report = {"repo_id": repo_id, "private": hub["private"], "dry_run": dry_run, "files": files}
    if chosen.acted_on:
        report["acted_on"] = chosen.acted_on
    if dry_run:
        for f in files:
            print(f"would upload {f['path_in_repo']} ({f['bytes']:,} bytes)")
            log.info("would upload %s (%d bytes)", f["path_in_repo"], f["bytes"])
        write_json(job.output.report, report)
        return report
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=report["private"], exist_ok=True)
        api.create_commit(
            repo_id,
            operations=[CommitOperationAdd(path_in_repo=dest, path_or_fileobj=src) for src, dest in plan],
            commit_message="Upload snaketune deployment model and evaluation",
        )
    except Exception as exc:
        raise StageError(f"hub.repo_id: pushing to {repo_id!r} failed ({type(exc).__name__}: {exc})") from exc
    report["url"] = str(url)
    log.info("pushed %d files to %s", len(files), url)
    write_json(job.output.report, report)
    return report


if "snakemake" in globals():
    snakemake_main(snakemake, run)
