"""The package's import graph reads bottom-up: no module imports, directly or through others, a
module that imports it, counting every import statement (inside functions and `if` blocks too)."""

import ast
import os

PACKAGE = "cotlab_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def module_files(root: str) -> dict[str, str]:
    """Module name -> file, for every .py file of the package at `root`."""
    modules = {}
    for directory, _, files in os.walk(root):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(directory, file)
                parts = os.path.relpath(path, os.path.dirname(root))[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                modules[".".join(parts)] = path
    return modules


def import_graph(root: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports: `from p import x` imports `p`, and `p.x`
    too if that is a module."""
    modules = module_files(root)
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state = {}  # module -> "open" while on the DFS path, "done" after

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return (
                    path[path.index(target) :] + [node, target]
                    if target in path
                    else [node, target]
                )
            if target not in state:
                cycle = visit(target, path + [node])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_find_cycle_sees_a_cycle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_sees_imports_inside_functions(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from cotlab_jax import b\n")
    (package / "b.py").write_text("from cotlab_jax.sub import c\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("from .. import a\nfrom . import d\n")
    (package / "sub" / "d.py").write_text("")
    graph = import_graph(str(package))
    assert graph["cotlab_jax.a"] == {"cotlab_jax", "cotlab_jax.b"}  # the package comes first
    assert graph["cotlab_jax.b"] == {"cotlab_jax.sub", "cotlab_jax.sub.c"}
    assert graph["cotlab_jax.sub.c"] == {
        "cotlab_jax",
        "cotlab_jax.a",
        "cotlab_jax.sub",
        "cotlab_jax.sub.d",
    }
    assert find_cycle(graph) == ["cotlab_jax.a", "cotlab_jax.b", "cotlab_jax.sub.c", "cotlab_jax.a"]


def test_the_package_has_no_import_cycle():
    graph = import_graph(ROOT)
    assert {"cotlab_jax.train", "cotlab_jax.evaluate", "cotlab_jax.packed"} <= graph.keys()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
