"""The project's layout: the method at the top level, what a first reading may skip in support/, the benchmarks in
bench/, and imports that run one way only, so the code can be read from the method down.

Every import counts, including the lazy ones inside functions: a circle through a function-level import is still a
circle for a reader following a value from module to module.
"""

import ast
import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHOD = {"data", "rearank", "setwise", "reward", "grpo", "eval"}  # the method and its two entry points
PACKAGES = ("support", "bench")
MODULES = {p.stem: p for p in ROOT.glob("*.py")} | {
    f"{pkg}.{p.stem}": p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py") if p.stem != "__init__"}


def project_imports(path: Path) -> set[str]:
    """The project modules that `path` imports anywhere in its body (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # from support import backend
    me = next(name for name, p in MODULES.items() if p == path)
    return (names & MODULES.keys()) - {me}


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


def test_project_imports_sees_both_import_forms_and_lazy_ones(tmp_path):
    path = ROOT / "support" / "lora.py"
    found = project_imports(path)
    assert {"data", "support.backend", "support.checkpoint"} <= found, found


def test_the_top_level_holds_the_method_and_its_two_entry_points_only():
    assert {p.stem for p in ROOT.glob("*.py")} == METHOD
    stray = [p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in {*PACKAGES, "tests"}
             and p.parent != ROOT and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    assert not stray, stray


def test_no_import_circle():
    graph = {name: project_imports(path) for name, path in MODULES.items()}
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_support_imports_neither_entry_point_nor_a_benchmark():
    for name, path in MODULES.items():
        if name.startswith("support."):
            bad = {m for m in project_imports(path) if m in {"grpo", "eval"} or m.startswith("bench.")}
            assert not bad, f"{name} imports {bad}"


def test_data_sits_on_the_bottom_layer():
    # the records, the metric and augmentation sit below the methods: data.py reads files through support/ only
    assert all(m.startswith("support.") for m in project_imports(MODULES["data"])), project_imports(MODULES["data"])


def test_doctests_are_collected_from_the_whole_tree():
    # pytest.ini's testpaths decide which modules --doctest-modules reads: the root takes in every package
    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    assert ini["pytest"]["testpaths"].split() == ["."]
    assert "--doctest-modules" in ini["pytest"]["addopts"]
    skipped = set(ini["pytest"].get("norecursedirs", "").split())
    assert not skipped & {*PACKAGES, "tests"}, skipped


def test_no_pointer_outside_the_repository():
    # the code and the README cite the papers, public repositories and docs/, never a document a reader cannot open
    pattern = re.compile(r"METHOD §|METHOD\.md|STYLE\.md|DEVELOPERS\.md|(?i:\bissue \d+|\bsession\b(?!\"))")  # not pytest's scope="session"
    tests = [p for p in (ROOT / "tests").glob("*.py") if p.name != Path(__file__).name]  # this file names them
    texts = [ROOT / "README.md", *MODULES.values(), *(ROOT / "docs").glob("*.md"), *tests]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in texts for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits[:20]


def test_the_readme_is_one_page_and_names_the_four_method_files():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200, len(text.splitlines())
    for name in ("grpo.py", "rearank.py", "reward.py", "data.py"):
        assert f"`{name}`" in text, name
