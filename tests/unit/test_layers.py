"""The house in layers (DESIGN.md): every module's imports read with `ast`, at module level and inside
functions, and checked against the rules: tasks never import the loop, the engine knows no task, the
task contract knows neither, the dashboard never reaches torch, and no import circle anywhere."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "sftkit"

# Imports of sftkit's own modules inside functions, outside the CLI and the dashboard (which import the
# heavy modules per command on purpose, so `--help` and a bad flag answer at once): each with why.
LAZY_ALLOWED = {
    ("sftkit.data.quality", "sftkit.models"): "data.quality stays torch-free on import: the CLI reads it at start",
}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    top: bool  # at module level (run on import), or inside a function / TYPE_CHECKING block
    names: tuple[str, ...]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def _runs_on_import(tree: ast.Module) -> set[int]:
    """Nodes executed when the module is imported: the body, and try/if blocks in it, but not
    `if TYPE_CHECKING:` (annotations only)."""
    out: set[int] = set()

    def visit(stmts):
        for n in stmts:
            out.add(id(n))
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                continue
            if isinstance(n, (ast.If, ast.Try)):
                visit(n.body)
                visit(n.orelse)
                for h in getattr(n, "handlers", []):
                    visit(h.body)
                visit(getattr(n, "finalbody", []))

    visit(tree.body)
    return out


def edges() -> list[Edge]:
    out = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        on_import = _runs_on_import(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    out.append(Edge(name, a.name, node.lineno, id(node) in on_import, ()))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                for a in node.names:  # `from . import checkpoint` imports the module sftkit.checkpoint
                    sub = f"{target}.{a.name}"
                    out.append(Edge(name, sub if sub in MODULES else target, node.lineno, id(node) in on_import,
                                    (a.name,)))
    return out


EDGES = edges()


def internal(e: Edge) -> bool:
    return e.target.split(".")[0] == "sftkit"


def where(e: Edge) -> str:
    return f"{MODULES[e.source].relative_to(ROOT.parent)}:{e.line} imports {e.target}"


def test_the_reader_sees_the_imports_it_should():
    """The rules below are only as good as this reader: check it on imports known to be there."""
    pairs = {(e.source, e.target) for e in EDGES}
    assert ("sftkit.trainer", "sftkit.tasks") in pairs
    assert ("sftkit.tasks.sft", "sftkit.checkpoint") in pairs  # `from .. import checkpoint`
    assert ("sftkit.cli", "sftkit.trainer") in pairs  # inside a function
    assert ("sftkit.engine", "torch") in pairs


def test_tasks_never_import_the_trainer_or_the_engine():
    bad = [where(e) for e in EDGES if e.source.startswith("sftkit.tasks")
           and e.target in ("sftkit.trainer", "sftkit.engine")]
    assert not bad, "a task imports the loop (tasks import sftkit.job): " + "; ".join(bad)


def test_the_engine_knows_no_task():
    bad = [where(e) for e in EDGES if e.source == "sftkit.engine" and
           (e.target.startswith("sftkit.tasks") or e.target in ("sftkit.trainer", "sftkit.classifier", "sftkit.distill"))]
    assert not bad, "; ".join(bad)
    text = MODULES["sftkit.engine"].read_text()
    for name in ("macro_f1", "classification", "preference", "distill"):
        assert name not in text, f"engine.py names {name!r}: a task's business"


def test_the_task_contract_knows_no_task_and_no_loop():
    job = {e.target for e in EDGES if e.source == "sftkit.job" and internal(e)}
    assert job <= {"sftkit.config"}, f"sftkit/job.py imports {sorted(job)}"
    assert MODULES["sftkit.job"].read_text().splitlines()[0].startswith('"""The task contract')


def _closure_on_import(start: str) -> dict[str, list[str]]:
    """What importing `start` imports (module-level imports, followed through sftkit's modules and
    each package's __init__), with the chain that leads to each."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        m = todo.pop()
        parents = [".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)]
        for nxt in [e.target for e in EDGES if e.source == m and e.top] + parents:
            if nxt not in chains:
                chains[nxt] = chains[m] + [nxt]
                if nxt in MODULES:
                    todo.append(nxt)
    return chains


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("sftkit.ui")) + ["sftkit.rundir"])
def test_the_dashboard_and_the_run_layout_never_reach_torch(module):
    chains = _closure_on_import(module)
    heavy = [m for m in chains if m.split(".")[0] == "torch"]
    assert not heavy, f"importing {module} imports torch: {' -> '.join(chains[heavy[0]])}"


def test_importing_the_dashboard_loads_no_torch():
    """The same, as Python sees it (a library the dashboard imports could pull torch in itself)."""
    code = "import sys, sftkit.ui, sftkit.ui.app, sftkit.ui.runs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_bad_config_is_answered_before_torch_or_transformers_load(tmp_path):
    """`sftkit train bad.yaml` answers in a fraction of a second: the CLI module and config reading
    load neither torch nor transformers (nor datasketch's scientific stack), and cmd_train reads the
    config before it imports the trainer."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: smollm2-135m\n")
    code = ("import sys\nfrom sftkit.cli import main\nrc = main(['train', sys.argv[1]])\n"
            "print(rc, sorted(m for m in ('torch', 'transformers', 'datasketch', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=120)
    assert "model is a section" in out.stderr
    assert out.stdout.strip() == "2 []", out.stdout


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_between_sftkit_modules():
    graph: dict[str, set[str]] = {}
    for e in EDGES:
        if internal(e) and e.target in MODULES and e.target != e.source:
            graph.setdefault(e.source, set()).add(e.target)
    cycles = _cycles(graph)
    assert not cycles, "import circles (module level or inside functions): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_name_is_imported_across_modules():
    bad = [f"{where(e)}: {n}" for e in EDGES if internal(e) for n in e.names if n.startswith("_") and n != "__version__"]
    assert not bad, "; ".join(bad)


def test_sftkit_modules_are_imported_at_the_top_outside_the_cli_and_the_dashboard():
    bad = [where(e) for e in EDGES if internal(e) and not e.top and e.target != e.source
           and e.source != "sftkit.cli" and not e.source.startswith("sftkit.ui")
           and (e.source, e.target) not in LAZY_ALLOWED]
    assert not bad, "imports inside functions (move them to the top of the file): " + "; ".join(bad)
