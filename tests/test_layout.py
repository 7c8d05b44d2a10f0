"""The project's layout: the top-level modules import one another in one direction only, so they can be read bottom-up.

Every import counts, including the lazy ones inside functions: a circle through a function-level import is still a
circle for a reader following a value from module to module.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def project_imports(path: Path) -> set[str]:
    """The project modules that `path` imports anywhere in its body (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return (names & MODULES.keys()) - {path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_circle_and_accepts_layers():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_top_level_modules_import_without_a_circle():
    graph = {name: project_imports(path) for name, path in MODULES.items()}
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_data_sits_on_the_bottom_layer():
    # the records, the loaders and the metric sit below the methods; what data.py uses imports at most files.py
    below = project_imports(MODULES["data"])
    assert below <= {"bm25", "download", "files"}, below
    assert all(project_imports(MODULES[m]) <= {"files"} for m in below)


def test_every_module_has_its_docstring_examples_run():
    # pytest.ini's testpaths decide which modules --doctest-modules reads: a module left out has its examples skipped
    import configparser

    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    listed = set(ini["pytest"]["testpaths"].split())
    assert {f"{name}.py" for name in MODULES if not name.startswith("bench_")} <= listed


def test_the_readme_file_table_lists_every_module_in_reading_order():
    # README's "The files" is read bottom-up: each module imports only modules listed above it
    import re

    order = []
    for row in (ROOT / "README.md").read_text().split("## The files", 1)[1].split("\n## ", 1)[0].splitlines():
        order += [name for name in re.findall(r"`(\w+)\.py`", row.split("|")[1]) if name in MODULES] if "|" in row else []
    assert set(order) == set(MODULES), set(MODULES) ^ set(order)
    for i, name in enumerate(order):
        if not name.startswith("bench_"):
            assert project_imports(MODULES[name]) <= set(order[:i]), f"{name} imports a module listed below it"
