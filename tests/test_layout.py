"""The shape of the code: imports point one way (no cycle among the modules of ``qeq_unroll`` and
``calculators``, counting imports inside functions), the core never imports ASE, and every function
of the core fits on a screen."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qeq_unroll", "calculators")


def _modules():
    return {
        (pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"): f for pkg in PACKAGES for f in sorted((ROOT / pkg).glob("*.py"))
    }


def _imports(name, path, modules):
    """The modules of the two packages that ``name`` imports anywhere in its file (package
    ``__init__`` modules, which gather everything, count as their submodules only)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([package] + ([node.module] if node.module else []))
            found |= {c for c in [base] + [f"{base}.{a.name}" for a in node.names] if c in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    return found - {name} - set(PACKAGES)


def _cycle(graph):
    """A cycle of ``graph`` as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = "done"
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items() if name not in PACKAGES}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    # the check can see a cycle: one made up is found
    assert _cycle({**graph, "qeq_unroll.kernels": graph["qeq_unroll.kernels"] | {"qeq_unroll.energy"}})


def test_core_never_imports_ase():
    for name, path in _modules().items():
        if name.startswith("qeq_unroll"):
            tree = ast.parse(path.read_text())
            names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            assert not any(m == "ase" or m.startswith("ase.") for m in names), name


#: The longest function the core may have (lines, docstring included).
MAX_FUNCTION_LINES = 80


def test_core_functions_fit_on_a_screen():
    long = []
    for name, path in _modules().items():
        if name.startswith("qeq_unroll"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                        long.append(f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
