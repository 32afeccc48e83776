"""The project's import graph, read with ``ast``: no module imports a module that imports it back (lazy imports inside
functions count), and nothing edits ``sys.path`` to reach the project's own modules."""

import ast
import os

from helpers import REPO

PACKAGES = ("networks", "tools")


def project_modules(root: str = REPO) -> dict[str, str]:
    """Dotted module name -> file, for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(root, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    modules[dotted.removesuffix(".__init__")] = path
    return modules


def imported_modules(path: str, module: str, modules: dict[str, str]) -> set[str]:
    """The project modules that ``module`` (at ``path``) imports anywhere in its body."""
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
    return {name for name in found if name in modules and name != module}


def import_graph(root: str = REPO) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {module: imported_modules(path, module, modules) for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for following in sorted(graph.get(node, ())):
            if state.get(following) == 1:
                return path[path.index(following):] + [following]
            if following not in state:
                cycle = visit(following)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_project_has_no_import_cycle():
    graph = import_graph()
    assert "networks.batch.runners" in graph and "tools.infer" in graph
    assert "networks.batch.volumes" in graph["networks.batch.engines"]  # edges are found
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_lazy_import_cycle(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "networks" / "a.py").write_text("def f():\n    from tools.b import g\n")
    (tmp_path / "tools" / "b.py").write_text("from networks.a import f\n\ndef g():\n    pass\n")
    cycle = find_cycle(import_graph(str(tmp_path)))
    assert cycle is not None and set(cycle) == {"networks.a", "tools.b"}


def test_the_engine_does_not_import_the_command_line_tools():
    graph = import_graph()
    for module, imported in graph.items():
        if module.startswith("networks"):
            assert not {m for m in imported if m.startswith("tools")}, module


def test_nothing_edits_sys_path_to_import_the_project():
    tests = [os.path.join(REPO, "tests", n) for n in os.listdir(os.path.join(REPO, "tests")) if n.endswith(".py")]
    for path in [*project_modules().values(), *tests]:
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        edits = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 and node.attr in ("insert", "append") and ast.unparse(node.value) == "sys.path"]
        assert not edits, f"{path}: sys.path edited at lines {edits}"
