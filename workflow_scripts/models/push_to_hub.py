"""Opt-in: upload the deployment model, its model card and the evaluation JSONs to the Hub.

Fails before any upload when `hub.repo_id` or HF_TOKEN is missing. `hub.dry_run` lists exactly
what would be uploaded (path in the repo, size) and uploads nothing.
"""

import logging
from pathlib import Path

from workflow_scripts.common import StageError, hf_token, snakemake_main, write_json

log = logging.getLogger("snaketune.push_to_hub")


def upload_plan(deployment_dir: str, evaluation_files: list[str]) -> list[tuple[str, str]]:
    """(local path, path in the repo) of every file to upload."""
    plan = [(str(p), p.relative_to(deployment_dir).as_posix()) for p in sorted(Path(deployment_dir).rglob("*")) if p.is_file()]
    plan += [(f, f"evaluation/{Path(f).name}") for f in evaluation_files]
    return plan


def run(deployment_dir: str, evaluation_files: list[str], hub: dict, report_path: str) -> dict:
    repo_id = hub.get("repo_id")
    if not repo_id:
        raise StageError("hub.repo_id: not set; pass --config hub.repo_id=<user>/<model> (nothing was uploaded)")
    plan = upload_plan(deployment_dir, evaluation_files)
    files = [{"path_in_repo": dest, "bytes": Path(src).stat().st_size} for src, dest in plan]
    report = {"repo_id": repo_id, "private": hub.get("private", True), "dry_run": bool(hub.get("dry_run")), "files": files}
    if hub.get("dry_run"):
        for f in files:
            print(f"would upload {f['path_in_repo']} ({f['bytes']:,} bytes)")
            log.info("would upload %s (%d bytes)", f["path_in_repo"], f["bytes"])
        write_json(report_path, report)
        return report
    token = hf_token()
    if not token:
        raise StageError("HF_TOKEN: not set in the environment or .env; it is needed to push (nothing was uploaded)")
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
    write_json(report_path, report)
    return report


def _from_snakemake(smk) -> None:
    run(
        smk.input.deployment_dir,
        [smk.input.base, smk.input.finetuned, smk.input.comparison],
        dict(smk.params.hub),
        smk.output.report,
    )


if "snakemake" in globals():
    snakemake_main(snakemake, _from_snakemake)
