"""The house rules of ttt/: imports in one direction (no circles), no file over 400 lines, and
docs/architecture.md's module map naming exactly the folders and modules that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ttt"
MAX_LINES = 400


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in the file (inside functions and
    `if TYPE_CHECKING:` too: a deferred import is still a dependency)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    top = root.name

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import sub` imports the submodule; `from mod import name` the module
                names = [f"{source}.{a.name}" for a in node.names]
                targets = [t for t in names if t in files]
                if len(targets) < len(names):
                    targets.append(source)
            for target in targets:
                if target == top or target.startswith(top + "."):
                    dep = known(target)
                    if dep and dep != mod:
                        graph[mod].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_go_one_way() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and graph["ttt.eval.rank"], "the graph was not built"
    assert cycles(graph) == [], "import circles in ttt/ (move the shared type down)"


def test_the_cycle_finder_finds_a_circle(tmp_path) -> None:
    pkg = tmp_path / "ttt"
    (pkg / "store").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "store" / "__init__.py").write_text("from ttt.store.base import Store\n")
    (pkg / "store" / "base.py").write_text("class Store: ...\n")
    (pkg / "a.py").write_text("def f():\n    from ttt.b import g  # deferred, still an edge\n")
    (pkg / "b.py").write_text("from ttt import a\nfrom . import store\n")
    graph = import_graph(pkg)
    assert graph["ttt.b"] == {"ttt.a", "ttt.store"}
    assert graph["ttt.store"] == {"ttt.store.base"}
    assert cycles(graph) == [["ttt.a", "ttt.b"]]


def test_no_file_is_over_400_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in sorted(PACKAGE.rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these by concern (at most {MAX_LINES} lines)"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_every_module_says_what_it_is_in_its_first_line(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    if path.name == "__init__.py" and not path.read_text(encoding="utf-8").strip():
        return
    assert doc, f"{path.relative_to(ROOT)}: no module docstring"


def map_paths() -> set[str]:
    """The `ttt/...` paths named in the first column of architecture.md's module map."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    paths: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `ttt/"):
            continue
        cell = line.split("|")[1]
        names = re.findall(r"`([^`]+)`", cell)
        folder = ""
        for name in names:
            if name.startswith("ttt/"):
                path = name
                folder = name if name.endswith("/") else name.rpartition("/")[0] + "/"
            else:  # a sibling written without its folder: `client.py` after `ttt/index/x.py`
                path = folder + name
            paths.add(path)
    return paths


def test_the_module_map_matches_the_folders() -> None:
    named = map_paths()
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert missing == [], "docs/architecture.md names paths that do not exist"
    # every package and every top-level module is in the map (a package's modules may be
    # named one by one or through the package)
    have = {f"ttt/{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    have |= {
        f"ttt/{p.name}"
        for p in PACKAGE.glob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    covered = named | {p.rpartition("/")[0] + "/" for p in named if not p.endswith("/")}
    assert sorted(have - covered) == [], "docs/architecture.md's module map leaves these out"
