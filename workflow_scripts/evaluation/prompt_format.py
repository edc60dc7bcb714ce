"""The prompt format of an experiment: how a question becomes the conversation the model was
trained and evaluated on, read back from the formatted test split, never retyped.

Every test prompt is the chat template applied to a row's `messages`: turns before the question
(the system prompt, fixed examples) and a user message the user template wrote around the
question (`query`). Whatever every row shares is the format; the chat command asks new questions
with it, and export_gguf writes its system prompt into the Ollama Modelfile.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from workflow_scripts import layout
from workflow_scripts.layout import EXPERIMENT_INDEX


@dataclass
class PromptFormat:
    """How a question becomes the conversation the model was trained on."""

    context: list[dict] = field(default_factory=list)  # turns before the question (the system prompt)
    user_prefix: str = ""  # text the user template puts around the question
    user_suffix: str = ""
    # the chat template's options (model.chat_template_kwargs)
    template_kwargs: dict = field(default_factory=dict)
    source: str | None = None  # the artifact it was read from

    @property
    def system_prompt(self) -> str | None:
        return next((m["content"] for m in self.context if m["role"] == "system"), None)

    def user_message(self, text: str) -> dict:
        return {"role": "user", "content": f"{self.user_prefix}{text}{self.user_suffix}"}


def _test_rows(path: Path) -> list[dict]:
    """The test split's messages and queries (formatted: messages as JSON text; preprocessed:
    messages as role/content structs)."""
    from workflow_scripts.data.streams import batches_of

    rows = [row for batch in batches_of(path, columns=["messages", "query"]) for row in batch]
    for row in rows:
        if isinstance(row["messages"], str):
            row["messages"] = json.loads(row["messages"])
    return rows


def find_test_split(experiment_dir: Path) -> Path | None:
    """The experiment's test split, where its experiment.json says the formatted (else the
    preprocessed) data is (paths relative to the workflow folder); None without experiment.json."""
    experiment_dir = Path(experiment_dir)
    index = experiment_dir / EXPERIMENT_INDEX
    if not index.is_file():
        return None
    artifacts = json.loads(index.read_text())
    root = layout.workdir_of_experiment(experiment_dir, (artifacts.get("own") or {}).get("evaluation"))
    shared = artifacts.get("shared") or {}
    for key, name in (("formatted", "test.parquet"), ("preprocessed", "test.parquet")):
        if shared.get(key) and (root / shared[key] / name).is_file():
            return root / shared[key] / name
    return None


def prompt_format(experiment_dir: Path) -> PromptFormat:
    """The prompt format of the experiment's test prompts (see prompt_format_of)."""
    return prompt_format_of(find_test_split(experiment_dir))


def prompt_format_of(path: Path | None) -> PromptFormat:
    """The prompt format of the test prompts in ``path`` (formatted or preprocessed test.parquet):
    the turns before the last user message (equal in every row), the text the user template
    writes around the question, and the chat template's options the split was rendered with."""
    if path is None:
        return PromptFormat()
    path = Path(path)
    stats = path.parent / "stats.json"  # format_dataset's statistics record the template's options
    kwargs = {}
    if stats.is_file():
        kwargs = json.loads(stats.read_text()).get("chat_template_kwargs") or {}
    rows = [r for r in _test_rows(path) if r.get("messages") and r["messages"][-1]["role"] == "user"]
    if not rows:
        return PromptFormat(template_kwargs=kwargs, source=str(path))
    contexts = [r["messages"][:-1] for r in rows]
    context = contexts[0] if all(c == contexts[0] for c in contexts) else []
    if not context:  # turns differ per row: keep only a system prompt they share
        systems = {json.dumps(c[0]) for c in contexts if c and c[0]["role"] == "system"}
        context = [json.loads(systems.pop())] if len(systems) == 1 and all(c for c in contexts) else []
    wraps = set()
    for r in rows:
        content, query = r["messages"][-1]["content"], r.get("query") or ""
        at = content.find(query) if query else -1
        wraps.add((content[:at], content[at + len(query) :]) if at >= 0 else None)
    prefix, suffix = wraps.pop() if len(wraps) == 1 and None not in wraps else ("", "")
    return PromptFormat(
        context=context, user_prefix=prefix, user_suffix=suffix, template_kwargs=kwargs, source=str(path)
    )
