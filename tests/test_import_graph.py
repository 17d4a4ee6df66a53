"""The package graph of vipo_jax reads one way: no cycle between its packages (imports inside
functions included, so none hides behind a lazy import), the reward and backbone registries and the
RL core stay below the toy world and the worlds, and only the worlds build a World."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "vipo_jax"


def _node(module: str) -> str:
    """``vipo_jax.a.b.c`` -> its package ``vipo_jax.a`` (a top-level module is its own node)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_edges() -> dict[str, set[str]]:
    """Package -> the packages it imports (every import statement, at any depth of the file)."""
    edges: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        src = _module_name(path)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.startswith("vipo_jax.") and (ROOT / (name.replace(".", "/") + ".py")).exists() \
                        or name.startswith("vipo_jax.") and (ROOT / name.replace(".", "/")).is_dir():
                    a, b = _node(src), _node(name)
                    if a != b:
                        edges.setdefault(a, set()).add(b)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def test_no_package_cycles():
    assert cycles(import_edges()) == []


def test_layers_stay_below_what_uses_them():
    edges = import_edges()
    below = {
        "vipo_jax.rl": {"vipo_jax.errors"},  # the RL core: pure math
        "vipo_jax.rewards": None,
        "vipo_jax.backbones": None,
        "vipo_jax.models": None,
    }
    assert edges.get("vipo_jax.rl", set()) <= below["vipo_jax.rl"], edges.get("vipo_jax.rl")
    for pkg in ("vipo_jax.rewards", "vipo_jax.backbones", "vipo_jax.models", "vipo_jax.rl", "vipo_jax.weights",
                "vipo_jax.sharding", "vipo_jax.nn"):
        higher = {"vipo_jax.toy", "vipo_jax.worlds", "vipo_jax.training", "vipo_jax.evaluation", "vipo_jax.plan"}
        assert not edges.get(pkg, set()) & higher, (pkg, edges.get(pkg, set()) & higher)
    # the toy world imports only downward: never the worlds, the loop or the evaluation
    assert not edges.get("vipo_jax.toy", set()) & {"vipo_jax.worlds", "vipo_jax.training", "vipo_jax.evaluation"}


def test_only_the_worlds_build_a_world():
    """``World(...)`` is constructed in vipo_jax/worlds/build.py only (tests, benchmarks and the
    planner call build_world)."""
    found = []
    for folder in ("vipo_jax", "tests", "benchmarks", "launch"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "World":
                    found.append(str(path.relative_to(ROOT)))
    assert found == ["vipo_jax/worlds/build.py"], found


def test_the_library_never_imports_torch_at_module_level():
    """torch belongs to the tests, benchmarks and pytorch_reference/; inside vipo_jax only the one-time
    ``.pt`` conversion imports it, inside a function (weights/torch_pickle.py)."""
    found = []
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "torch"]
    assert not found, found


def test_training_and_evaluation_load_without_torch():
    """Importing the train command line, the worlds, evaluation, the planner and export does not pull
    torch in (a fresh process; one command line per process: they define the same flags)."""
    import subprocess
    import sys

    code = ("import sys; import vipo_jax.train, vipo_jax.worlds, vipo_jax.evaluation, vipo_jax.plan.planner, "
            "vipo_jax.models.flux.export; print(sorted(m for m in ('torch', 'diffusers', 'transformers.models') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("[]"), out.stdout
