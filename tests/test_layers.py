"""The import layering of lass_sparse: no import circle, and lower layers never import upper ones.

Parses every ``.py`` under ``lass_sparse/`` with :mod:`ast` (no import), top-level and
function-level statements alike. Nodes are modules; a package's ``__init__`` is its own node
(``lass_sparse.nn``). ``import lass_sparse.a.b`` and ``from lass_sparse.a import b`` (``b`` a
submodule) are edges to ``lass_sparse.a.b``; ``from lass_sparse.a import name`` is an edge to
``lass_sparse.a`` (the module, or the package ``__init__``), unless the ``__init__`` does not
bind ``name``: then it is a submodule, e.g. the compiled ``_C``. Relative imports are resolved.
``importlib.import_module`` calls (the CLI's command modules, the backends) name their modules
at run time and are not seen.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import lass_sparse

ROOT = pathlib.Path(lass_sparse.__file__).parent
PKG = "lass_sparse"

# Layers: the kernels and the torch-level rules below, then MaskBank, then nn / optim, then the
# shared MT code (corpus, directions, metrics: torch-free, beside them), then the LaSS pipeline
# and the HF integration on top, side by side (hf does not import lass).
LOW = ("lass_sparse.ops", "lass_sparse.backends", "lass_sparse.bitmask", "lass_sparse.reference",
       "lass_sparse.pruning", "lass_sparse.fileio",
       "lass_sparse.maskio")
UPPER = ("lass_sparse.nn", "lass_sparse.masks", "lass_sparse.optim", "lass_sparse.mt",
         "lass_sparse.lass", "lass_sparse.hf")
MAY_IMPORT_LASS = ("lass_sparse.lass", "lass_sparse.cli", "lass_sparse.showcase",
                   "lass_sparse.serve", "lass_sparse.testing")
MT = "lass_sparse.mt"
MT_MAY_IMPORT = (MT, "lass_sparse.fileio")  # standard library only (test below)


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _bound_names(path: pathlib.Path) -> set[str]:
    """Names a module binds at top level (also inside top-level if / try blocks)."""
    out: set[str] = set()
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo += getattr(node, field, [])
        elif isinstance(node, ast.ExceptHandler):
            todo += node.body
    return out


def _import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    bound: dict[str, set[str]] = {}

    def target(name: str) -> str | None:
        """The module node ``name`` names: itself, else its longest known prefix."""
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = graph[mod]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _under(a.name, (PKG,)):
                        edges.add(target(a.name))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                if not _under(src, (PKG,)):
                    continue
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in mods:
                        edges.add(sub)
                    elif src in mods and mods[src].name == "__init__.py" and a.name not in (
                        bound.setdefault(src, _bound_names(mods[src]))
                    ):  # Python imports it as a submodule: a compiled extension (``_C``)
                        graph.setdefault(sub, set())
                        edges.add(sub)
                    else:
                        edges.add(target(src))
        edges.discard(mod)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (c := visit(n)) is not None:
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)) is not None:
            return c
    return None


def _reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module ``start`` imports, directly or not, with one import chain to it."""
    seen = {start: [start]}
    todo = [start]
    while todo:
        m = todo.pop()
        for n in sorted(graph[m]):
            if n not in seen:
                seen[n] = seen[m] + [n]
                todo.append(n)
    del seen[start]
    return seen


def test_the_import_graph_is_read_correctly():
    g = _import_graph()
    assert "lass_sparse.pruning" in g["lass_sparse.nn.convert"]  # from ..pruning import ...
    assert "lass_sparse.masks" in g["lass_sparse.nn.context"]
    assert "lass_sparse.nn" in g["lass_sparse.lass.pipeline"]  # a package __init__
    assert "lass_sparse.maskio" in g["lass_sparse.masks"]  # from . import maskio
    assert "lass_sparse.reference" in g["lass_sparse.showcase"]  # from lass_sparse import ..
    assert "lass_sparse._C" in g["lass_sparse.backends.cpu"]  # compiled, not a .py file
    assert "lass_sparse.lass.runtime" in g["lass_sparse.lass.experiment.runner"]  # from .. import
    assert "lass_sparse.ops" in g["lass_sparse.lass.experiment.jobs"]  # from ...ops import
    assert "lass_sparse.fileio" in g["lass_sparse.lass.commands"]  # inside a function
    assert "lass_sparse.mt.direction" in g["lass_sparse.hf.data"]  # from ..mt.direction import
    assert "lass_sparse.mt.metrics" in g["lass_sparse.lass.pipeline"]  # inside a function


def test_the_import_graph_has_no_cycle():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_lower_layers_do_not_import_upper_ones():
    g = _import_graph()
    bad = []
    for mod in g:
        if not _under(mod, LOW):
            continue
        for dep, chain in _reachable(g, mod).items():
            if _under(dep, UPPER):
                bad.append(" -> ".join(chain))
    assert not bad, "lower layer imports an upper one:\n" + "\n".join(bad)


def test_masks_does_not_import_nn():
    chains = [" -> ".join(c) for d, c in _reachable(_import_graph(), "lass_sparse.masks").items()
              if _under(d, ("lass_sparse.nn",))]
    assert not chains, "\n".join(chains)


def test_fileio_is_standard_library_only():
    tree = ast.parse((ROOT / "fileio.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {n.split(".")[0] for n in names} <= set(sys.stdlib_module_names), names


def test_only_the_application_layers_import_lass():
    bad = [f"{m} -> {d}" for m, deps in _import_graph().items()
           if not _under(m, MAY_IMPORT_LASS) for d in deps if _under(d, ("lass_sparse.lass",))]
    assert not bad, "\n".join(bad)


def test_mt_imports_neither_lass_nor_hf_nor_the_kernels():
    g = _import_graph()
    mods = [m for m in g if _under(m, (MT,))]
    assert {f"{MT}.corpus", f"{MT}.direction", f"{MT}.metrics"} <= set(mods)
    bad = [" -> ".join(chain) for m in mods for d, chain in _reachable(g, m).items()
           if not _under(d, MT_MAY_IMPORT)]
    assert not bad, "lass_sparse.mt imports outside itself (and fileio):\n" + "\n".join(bad)


def test_hf_does_not_import_lass():
    g = _import_graph()
    bad = [" -> ".join(chain) for m in g if _under(m, ("lass_sparse.hf",))
           for d, chain in _reachable(g, m).items() if _under(d, ("lass_sparse.lass",))]
    assert not bad, "lass_sparse.hf imports lass_sparse.lass:\n" + "\n".join(bad)
