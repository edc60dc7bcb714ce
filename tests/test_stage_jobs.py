"""The stage adapter: a script reads its rule's input/output/params by the rule's own names."""

import json
import re

import pytest
from helpers import REPO

from workflow_scripts.stage import Job


def test_job_from_snakemake_is_plain_and_named():
    from snakemake.iocontainers import Namedlist

    class Smk:
        input = Namedlist(fromdict={"train": "a/train.parquet", "parts": ["x.jsonl", "y.jsonl"]})
        output = Namedlist(fromdict={"report": "r.json"})
        params = Namedlist(fromdict={"filters": {"drop_empty": True, "min_chars": {"q": 1}}, "label": "base"})
        threads = 3

    job = Job.from_snakemake(Smk())
    assert job.input.train == "a/train.parquet" and job.input["parts"] == ["x.jsonl", "y.jsonl"]
    assert type(job.input.parts) is list and type(job.params.filters) is dict
    assert job.params.filters["min_chars"] == {"q": 1} and job.threads == 3
    with pytest.raises(AttributeError, match=r"no output named 'stats' \(it has: report\)"):
        job.output.stats  # noqa: B018
    assert Job(**json.loads(json.dumps(job.to_dict()))) == job  # what a relaunched process reads


def dict_helpers() -> dict[str, set[str]]:
    """Functions of the rules files that take no argument and return a dict literal (a rule's
    section spreads them: ``**train_outputs()``) -> the keys of that dict."""
    helpers = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for name, body in re.findall(r"^def (\w+)\(\):\n((?:    .*\n|\s*\n)+)", smk.read_text(), re.M):
            if re.search(r"^    return \{$", body, re.M):
                helpers[name] = set(re.findall(r'^ {8}"(\w+)":', body, re.M))
    return helpers


def rule_names() -> dict[str, dict[str, set[str]]]:
    """script file -> role -> the names the rules running it declare (every rule that runs it);
    ``**helper()`` in a section declares the keys of the dict ``helper`` returns."""
    found: dict[str, dict[str, set[str]]] = {}
    helpers = dict_helpers()
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=\s*rule \w+:)", smk.read_text()):
            script = re.search(r'script:\s*\n\s*"\.\./(workflow_scripts/[\w/]+\.py)"', block)
            if not script:
                continue
            roles = found.setdefault(script.group(1), {"input": set(), "output": set(), "params": set()})
            for role in roles:
                section = re.search(rf"\n(\s+){role}:\n((?:\1 {{4}}.*\n|\s*\n)+)", block)
                if section:
                    roles[role] |= set(
                        re.findall(rf"^{section.group(1)} {{4}}(\w+)=", section.group(2), re.M)
                    )
                    for spread in re.findall(
                        rf"^{section.group(1)} {{4}}\*\*(\w+)\(\),", section.group(2), re.M
                    ):
                        assert helpers.get(spread), f"{smk.name}: {role}: **{spread}() is no dict helper"
                        roles[role] |= helpers[spread]
    return found


def test_every_stage_script_reads_names_its_rules_declare():
    checked = 0
    for script, roles in rule_names().items():
        text = (REPO / script).read_text()
        if "def run(job: Job)" not in text:
            continue  # not (yet) a Job-reading stage
        used = re.findall(r"\bjob\.(input|output|params)\.(\w+)\b(?!\s*\()", text)  # not .get(...)
        for role, name in used:
            assert name in roles[role], (
                f"{script} reads job.{role}.{name}; its rules declare {sorted(roles[role])}"
            )
        checked += 1
    assert checked >= 8
