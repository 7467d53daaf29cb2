"""The package's import graph holds the layering of docs/ARCHITECTURE.md: each subpackage
imports only the subpackages below it (``torchmoe/__init__.py`` imports none), ``models`` and
``kernels`` never reach ``torch.distributed``, and no module imports itself back through others.

Read from the source with ``ast``, so a forbidden import fails here before it can work by
accident at runtime. An import is an ``import`` statement (function-level ones included), an
``importlib.import_module`` / ``__import__`` of a literal name, or a literal
'torchmoe.module:function' reference (how plans are named); ``torch.distributed`` also counts
when reached as an attribute (``torch.distributed.all_reduce``) or through ``torch.ops``'
c10d operators. ``python tests/test_layering.py [TREE]`` prints the graph with the lines of
each subpackage.
"""

import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "torchmoe"

# Bottom to top: a subpackage may import those listed for it, never one above it.
ALLOWED = {
    "": set(),  # torchmoe/__init__.py: it runs before every submodule
    "kernels": set(),
    "models": {"kernels"},
    "config": {"models", "kernels"},
    "quant": {"config", "models", "kernels"},
    "parallel": {"quant", "config", "models", "kernels"},
    "data": {"config"},
    "inference": {"data", "config", "models", "kernels"},  # sampling from a built model
    "train": {"parallel", "quant", "data", "config", "models", "kernels"},
    "convert": {"train", "parallel", "quant", "data", "config", "models", "kernels"},
}
NO_DISTRIBUTED = ("models", "kernels")  # model code knows nothing about distribution
# References by name that point up on purpose (module -> target prefixes), each with its reason:
# the registry names each family's default plan (parallel.plans.load_plan resolves it) and its
# Hugging Face adapter (convert.hf resolves it).
NAMED_UPWARD = {
    "torchmoe.config.registry": ("torchmoe.parallel.plans", "torchmoe.convert.hf."),
}


def named_upward(module: str, target: str) -> bool:
    return any(
        target == p or (target.startswith(p) and p.endswith("."))
        for p in NAMED_UPWARD.get(module, ())
    )


_NAMED = re.compile(r"^(torchmoe(?:\.\w+)+)(?::\w+)?$")


def dotted(node: ast.AST) -> str | None:
    """'a.b.c' for an attribute chain on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module ``path`` imports, absolute (relative imports resolved)."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and dotted(node.func) in ("importlib.import_module", "import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if named := _NAMED.match(node.value):
                found.add(named.group(1))
        elif isinstance(node, ast.Attribute) and (chain := dotted(node)):
            if chain.startswith("torch.distributed") or chain.startswith("torch.ops._c10d"):
                found.add(chain)
    return found


def subpackage(module: str) -> str | None:
    """'models' for torchmoe.models.*, '' for torchmoe itself, None outside torchmoe."""
    parts = module.split(".")
    if parts[0] != "torchmoe":
        return None
    return parts[1] if len(parts) > 1 else ""


def module_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """torchmoe module -> the torchmoe modules it imports (names that are modules only)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    return {
        name: {m for m in imports(path, root) if m in files and m != name}
        for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of modules, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def violations(root: Path = PACKAGE) -> list[str]:
    """Every import that breaks the layering, as 'module imports module (why)'."""
    out = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        own = subpackage(name)
        if own is None:
            continue
        if own not in ALLOWED:
            out.append(f"{name}: subpackage {own!r} has no place in ALLOWED; add it")
            continue
        reported: list[str] = []
        for target in sorted(imports(path, root)):
            if any(target.startswith(f"{r}.") for r in reported):
                continue  # 'from a.b import c' also yields a.b.c: one line per import
            other = subpackage(target)
            if named_upward(name, target):
                continue
            if other is not None and other != own and other not in ALLOWED[own]:
                out.append(f"{name} imports {target} ({own} may not import {other})")
                reported.append(target)
            if own in NO_DISTRIBUTED and target.startswith(
                ("torch.distributed", "torch.ops._c10d")
            ):
                out.append(f"{name} imports {target} ({own} knows nothing about distribution)")
                reported.append(target)
    return out


def test_every_subpackage_imports_only_the_layers_below_it():
    assert violations() == []


def test_no_module_imports_itself_back():
    assert find_cycle(module_graph()) is None


def test_the_layers_form_a_strict_order():
    """ALLOWED itself has no cycle, so the subpackage graph cannot have one either."""
    assert find_cycle(ALLOWED) is None
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages | {""} == set(ALLOWED)


@pytest.mark.parametrize(
    "where,line,fragment",
    [
        ("models/common/planted.py", "from torchmoe.config.schema import JobConfig", "config"),
        ("models/planted.py", "import torch.distributed as dist", "distribution"),
        ("kernels/planted.py", "from torchmoe.parallel import dims", "parallel"),
        ("config/planted.py", "from torchmoe.train.trainer import Trainer", "train"),
        ("parallel/planted.py", "def f():\n    from torchmoe.train import metrics", "train"),
        ("models/moe/planted.py", "from ...parallel.dims import ParallelDims", "parallel"),
        ("models/planted.py", "import torch\ntorch.distributed.all_reduce(x)", "distribution"),
        ("kernels/planted.py", "import torch\nf = torch.ops._c10d_functional.all_reduce", "distri"),
        ("__init__.py", "from torchmoe.train.trainer import Trainer", "may not import train"),
        (
            "config/planted.py",
            "import importlib\nimportlib.import_module('torchmoe.train')",
            "train",
        ),
        ("config/planted.py", "PLAN = 'torchmoe.parallel.plans:parallelize'", "parallel"),
    ],
)
def test_a_planted_forbidden_import_is_caught(tmp_path, where, line, fragment):
    import shutil

    copy = tmp_path / "torchmoe"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / where).write_text(line + "\n")
    found = violations(copy)
    assert len(found) == 1 and fragment in found[0], found


def test_a_planted_cycle_is_caught():
    graph = module_graph()
    graph["torchmoe.models.moe.router"] = graph["torchmoe.models.moe.router"] | {
        "torchmoe.models.moe.moe"
    }
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]


def _lines(root: Path) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for path in root.rglob("*.py"):
        name = subpackage(module_name(path, root)) or "(top)"
        counts[name] += len(path.read_text().splitlines())
    return counts


if __name__ == "__main__":
    root = Path(sys.argv[1]).resolve() / "torchmoe" if len(sys.argv) > 1 else PACKAGE
    edges: dict[str, set[str]] = defaultdict(set)
    for path in root.rglob("*.py"):
        own = subpackage(module_name(path, root))
        for target in imports(path, root):
            other = subpackage(target)
            if own and other and other != own and not named_upward(module_name(path, root), target):
                edges[own].add(other)
    for name, n in sorted(_lines(root).items()):
        print(f"{name:10s} {n:6d} lines -> {', '.join(sorted(edges[name])) or '-'}")
