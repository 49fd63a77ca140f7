"""The package stays readable in parts: no function in aimv2/ is over MAX_LINES lines, and no import
cycle exists between aimv2's modules (both read from the source with `ast`; nothing is imported).

A function's length is counted from its `def` line to its last line (docstring and comments included,
decorators not); nested functions count inside their parent too. An import edge is any `import` /
`from ... import` of an aimv2 module anywhere in a module (inside functions too: a lazy import still
ties the two modules together). `aimv2.kernels` is a standalone package (kernels/, never importing
aimv2) and a module's import of its own parent package is implied by Python itself; neither is an edge.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "aimv2"
MAX_LINES = 60


def _modules(pkg: Path = PKG) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `pkg` (a package is named by its __init__.py)."""
    out = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def long_functions(pkg: Path = PKG, limit: int = MAX_LINES) -> list[str]:
    """'path:line name (n lines)' of every function or method longer than `limit` lines."""
    out = []
    for path in _modules(pkg).values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(pkg.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def _targets(mod: str, is_pkg: bool, node: ast.AST, mods: dict) -> set[str]:
    """The aimv2 modules that import statement `node` in module `mod` loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:                                  # relative: from the package, up level - 1
            pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
            pkg = pkg[:len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([node.module] if node.module else []))
        # `from a.b import c` loads a.b.c when that is a module, else an attribute of a.b
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = set()
    for name in names:
        if name == "aimv2.kernels" or name.startswith("aimv2.kernels."):
            continue
        while name and name not in mods:                # `import a.b.c` of an attribute path
            name = name.rpartition(".")[0]
        if name and name != mod and not mod.startswith(name + "."):
            out.add(name)
    return out


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    mods = _modules(pkg)
    graph = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[mod] = set().union(*(_targets(mod, path.name == "__init__.py", n, mods) for n in ast.walk(tree)
                                   if isinstance(n, (ast.Import, ast.ImportFrom))))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colours white / grey / black)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "grey"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "grey":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = "black"
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_function_in_aimv2_is_over_the_limit():
    too_long = long_functions()
    assert not too_long, f"functions over {MAX_LINES} lines (split them into helpers): " + "; ".join(too_long)


def test_no_import_cycle_in_aimv2():
    graph = import_graph()
    assert "aimv2.data.loader" in graph and "aimv2.data.decode" in graph["aimv2.data.loader"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_see_what_they_forbid(tmp_path):
    """The checks themselves: a planted cycle (direct, relative and lazy imports) and a long function
    are reported; a parent-package import and aimv2.kernels are not edges."""
    pkg = tmp_path / "aimv2"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def f():\n    from aimv2.sub import b\n")
    (pkg / "a.py").write_text("from aimv2 import kernels\nfrom aimv2.kernels import x\nimport aimv2\n"
                              "def g():\n    from .sub.b import h\n" + "\n".join(f"    y{i} = {i}" for i in range(60)) + "\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    graph = import_graph(pkg)
    assert graph["aimv2.a"] == {"aimv2.sub.b"} and graph["aimv2.sub.b"] == {"aimv2.a"}
    assert graph["aimv2"] == {"aimv2.sub.b"}
    assert find_cycle(graph) in (["aimv2.a", "aimv2.sub.b", "aimv2.a"], ["aimv2.sub.b", "aimv2.a", "aimv2.sub.b"])
    assert long_functions(pkg) == ["aimv2/a.py:4 g (62 lines)"]
    (pkg / "sub" / "b.py").write_text("import aimv2.sub\nfrom aimv2.sub import c\n")
    assert find_cycle(import_graph(pkg)) is None
