"""The code's structure, checked: imports run one way (no circle, nothing in evaluation/ imports
sweeps/), and layout.py is the one module that spells a path of the workflow's layout.

`python tests/test_structure.py` prints the import drawing (module -> what it imports)."""

import ast
import io
import re
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "workflow_scripts"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((REPO / PACKAGE).rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules ``path`` imports anywhere (function-level imports included: they are
    what hid the last circle)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            # the longest known module the name starts with (`from a import b` imports a.b if it is one)
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != PACKAGE:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}
    # importing a.b runs a/__init__.py: the package's own (empty) inits add no edge worth drawing
    return {m: {d for d in deps if mods[d].name != "__init__.py"} for m, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_have_no_circle():
    graph = import_graph()
    assert len(graph) > 50 and graph["workflow_scripts.config"]  # the walk found the package
    assert cycles(graph) == []


def test_a_circle_is_found():
    """The detector itself: a drawn circle is reported (so an empty answer above means something)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_layers_run_one_way():
    graph = import_graph()
    evaluation = {m: d for m, d in graph.items() if m.startswith("workflow_scripts.evaluation")}
    assert evaluation and not {m: d for m, d in evaluation.items() if any(".sweeps" in x for x in d)}
    # the config layer: errors imports nothing; config/checks/credentials never import a stage
    assert graph["workflow_scripts.errors"] == set()
    for m in ("config", "checks", "credentials", "layout"):
        stages = {d for d in graph[f"workflow_scripts.{m}"] if ".sweeps" in d or ".training" in d}
        assert not stages, (m, stages)


# The layout's path literals: the folders, file names and patterns only layout.py spells.
LAYOUT_LITERAL = re.compile(
    r"(?<![\w./-])results/"  # results/... built by hand (a script path `../workflow_scripts/...` is not one)
    r"|sweeps/\{|best\.json|halving\.json|leaderboard\.json|experiment\.json"
    r"|/checkpoints\b|\bcheckpoints/|/halving/|/rung-\{|slot-\{|promotion-\{rung|finalist-[{\\]"
)
LAYOUT_FILES = {REPO / PACKAGE / "layout.py"}


def code_strings(path: Path):
    """(line, text) of every string literal of a .py / .smk file outside docstrings and comments
    (Snakemake files tokenize as Python; triple-quoted strings are the docstrings)."""
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.STRING and not re.match(r"[rRbBfFuU]*('''|\"\"\")", tok.string):
            yield tok.start[0], tok.string


def layout_literals(paths) -> list[str]:
    return [
        f"{p.relative_to(REPO) if p.is_relative_to(REPO) else p.name}:{line}: {text}"
        for p in paths
        if p not in LAYOUT_FILES
        for line, text in code_strings(p)
        if LAYOUT_LITERAL.search(text)
    ]


def test_only_layout_spells_a_path():
    files = [*(REPO / PACKAGE).rglob("*.py"), *(REPO / "rules").glob("*.smk"), REPO / "Snakefile"]
    assert layout_literals(files) == []


def test_a_spelled_path_is_found(tmp_path):
    """The check itself, on the kinds of literal it must catch and the prose it must leave alone."""
    bad = tmp_path / "bad.smk"
    bad.write_text(
        "SWEEP_DIR = f\"results/sweeps/{SWEEP['name']}\"\n"
        'x = lambda w: f"results/{w.experiment}/checkpoints"\n'
        'best = SWEEP_DIR + "/best.json"\n'
        '"""results/{experiment}/ in a docstring"""\n'
        "# results/sweeps/{sweep} in a comment\n"
        'script = "../workflow_scripts/sweeps/leaderboard.py"\n'
    )
    assert [hit.split(":")[1] for hit in layout_literals([bad])] == ["1", "2", "3"]


if __name__ == "__main__":
    for module, deps in sorted(import_graph().items()):
        print(
            module.removeprefix("workflow_scripts."),
            "->",
            ", ".join(sorted(d.removeprefix("workflow_scripts.") for d in deps)),
        )
    print("circles:", cycles(import_graph()) or "none")
