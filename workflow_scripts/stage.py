"""The stage adapter: what a rule hands its script (`Job`), the script's entry (`snakemake_main`),
and the error a stage raises for bad input (`StageError`)."""

import logging
import multiprocessing
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from workflow_scripts.logs import mask_secrets, setup_logging

log = logging.getLogger("snaketune")


class StageError(RuntimeError):
    """A user-facing error: bad input, bad config. The message names the key, file or column."""


class Named(Mapping[str, Any]):
    """A rule's named inputs, outputs or params, read as in the rule: ``job.input.train`` (or
    ``job.input["train"]``). A name the rule does not have is an error that lists the ones it has."""

    def __init__(self, values: Mapping[str, Any] | None = None, role: str = "name"):
        self._values = dict(values or {})
        self._role = role

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(
                f"the rule has no {self._role} named {name!r} (it has: {', '.join(self._values) or 'none'})"
            ) from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Named({self._values!r})"


def _plain(value: Any) -> Any:
    """Snakemake's values as plain Python: paths as str, named lists as lists, mappings as dicts."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Job:
    """What a rule hands its script, under the rule's own names: ``job.input.train``,
    ``job.output.report``, ``job.params.filters``, ``job.threads``. Built from Snakemake's object
    by `snakemake_main`, or directly (tests, benchmarks, a notebook):
    ``Job(input={"test": ...}, output={"comparison": ...}, params={"evaluation": cfg})``."""

    input: Mapping[str, Any] = field(default_factory=dict)
    output: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    threads: int = 1

    def __post_init__(self) -> None:
        for role in ("input", "output", "params"):
            object.__setattr__(self, role, Named(_plain(getattr(self, role)), role))

    @classmethod
    def from_snakemake(cls, smk) -> "Job":
        """The named entries of the rule (unnamed inputs, such as a list of data files, are left out)."""
        return cls(
            input=dict(smk.input.items()),
            output=dict(smk.output.items()),
            params=dict(smk.params.items()),
            threads=int(smk.threads or 1),
        )

    def to_dict(self) -> dict:
        """JSON-ready; ``Job(**job.to_dict())`` is the same job (a relaunched process reads it)."""
        return {
            "input": dict(self.input),
            "output": dict(self.output),
            "params": dict(self.params),
            "threads": self.threads,
        }


def snakemake_main(smk, run_stage) -> None:
    """Entry for a `script:` rule: log to the rule's log, run ``run_stage(Job)`` with the rule's
    named input/output/params, turn StageError into a clean exit."""
    if multiprocessing.parent_process() is not None:  # a stage's worker process, never the stage again
        return
    setup_logging(smk.log[0] if smk.log else None)
    try:
        run_stage(Job.from_snakemake(smk))
    except StageError as exc:
        log.error("%s", exc)
        print(mask_secrets(f"ERROR: {exc}"), file=sys.__stderr__)
        sys.exit(1)


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))
