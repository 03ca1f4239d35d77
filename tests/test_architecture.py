"""The pack's import graph, read from the source with ``ast`` (nothing is imported): no cycle between
modules, no import against the layer order, nothing below ``nodes/`` importing ComfyUI at module level,
no source module over the size limit. ARCHITECTURE.md explains the rules; a self-test plants each
fault in a scratch tree, so the checks cannot pass for want of finding anything.

The graph has one node per module (``attention.dmsa``; a package's ``__init__.py`` is the package,
``attention``; the root ``__init__.py`` is ``ROOT``) and one edge per import statement, module-level
or inside a function (a lazy import is still a dependency): relative imports, ``personalize_pack.``
imports (tools/ and bench/ import the pack under that name, tools/pack_import.py), and, in tools/ and
bench/, plain imports of a sibling script that those folders put on ``sys.path``."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from pack_paths import PACK_ROOT

PACK_NAME = "personalize_pack"
ROOT = "ROOT"
# A module may import modules of its own package or of a lower layer. The root __init__.py sits just
# above nodes/; tools/ and bench/ (command lines, benchmarks) are on top of everything.
LAYERS = {"files": 1, "references": 2, "attention": 3, "training": 4, "metrics": 5, "nodes": 6, ROOT: 6.5,
          "tools": 7, "bench": 7, "world": 7}
SCRIPT_DIRS = ("tools", "bench")            # folders whose scripts import each other by plain name
COMFYUI = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server",
           "execution", "node_helpers", "latent_preview"}
MAX_LINES = 450
SKIP_DIRS = {"tests", "__pycache__"}        # and every folder whose name starts with '.'
GENERATED_MARK = "@generated"               # in the first lines of a generated module: no size limit


@dataclass(frozen=True)
class Import:
    src: str            # importing module
    dst: str            # imported module of the pack, or the top-level name of an outside module
    line: int
    lazy: bool          # inside a function
    internal: bool      # dst is a module of the pack


@dataclass
class Module:
    name: str
    path: Path
    lines: int
    generated: bool


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or ROOT


def package_of(name: str) -> str:
    return name.split(".")[0]


def scan(root: Path) -> tuple[dict[str, Module], list[Import]]:
    """Every non-test module under ``root`` and every import in it."""
    modules: dict[str, Module] = {}
    trees = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in SKIP_DIRS or p.startswith(".") for p in rel.parts[:-1]):
            continue
        text = path.read_text(encoding="utf-8")
        name = module_name(rel)
        modules[name] = Module(name, rel, len(text.splitlines()),
                               any(GENERATED_MARK in ln for ln in text.splitlines()[:5]))
        trees[name] = ast.parse(text, filename=str(path))
    imports = []
    for name, tree in trees.items():
        is_pkg = modules[name].path.name == "__init__.py"
        imports += _imports(name, is_pkg, tree, modules)
    return modules, imports


def _resolve(target: str, modules) -> str | None:
    """The module of the pack a dotted name (``attention.dmsa``, ``""`` for the root) refers to."""
    if target == "":
        return ROOT
    return target if target in modules else None


def _imports(name: str, is_pkg: bool, tree: ast.AST, modules) -> list[Import]:
    package = name if is_pkg else (name.rpartition(".")[0] if name != ROOT else "")
    if name == ROOT:
        package = ""
    folder = package_of(name)
    found = []

    def add(node, dst, lazy, internal):
        found.append(Import(name, dst, node.lineno, lazy, internal))

    def absolute(dotted: str, node, lazy, names=()):
        if dotted == PACK_NAME or dotted.startswith(PACK_NAME + "."):
            base = dotted[len(PACK_NAME) + 1:]
            for dst in _targets(base, names, modules):
                add(node, dst, lazy, True)
            return
        top = dotted.split(".")[0]
        if folder in SCRIPT_DIRS and name != ROOT:
            for d in (folder,) + tuple(x for x in SCRIPT_DIRS if x != folder):
                if f"{d}.{top}" in modules:
                    add(node, f"{d}.{top}", lazy, True)
                    return
        add(node, top, lazy, False)

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                continue                                    # never runs
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    absolute(alias.name, child, lazy)
            elif isinstance(child, ast.ImportFrom):
                names = [a.name for a in child.names]
                if child.level:
                    parts = package.split(".") if package else []
                    up = child.level - 1
                    if up > len(parts):
                        raise ValueError(f"{name}:{child.lineno}: relative import above the pack root")
                    base = ".".join(parts[:len(parts) - up] + ([child.module] if child.module else []))
                    for dst in _targets(base, names, modules):
                        add(child, dst, lazy, True)
                else:
                    absolute(child.module, child, lazy, names)
            visit(child, inner)

    visit(tree, False)
    return found


def _targets(base: str, names, modules) -> list[str]:
    """``from base import names``: the submodules among ``names``, else ``base`` itself."""
    subs = [f"{base}.{n}" if base else n for n in names]
    hits = [s for s in subs if s in modules]
    if hits and len(hits) == len(subs):
        return hits
    own = _resolve(base, modules)
    return hits + ([own] if own else [])


def _is_type_checking(test) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


# ------------------------------------------------------------------------------------------ checks

def find_cycles(imports: list[Import]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of modules (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.internal and imp.dst != imp.src:
            graph.setdefault(imp.src, set()).add(imp.dst)
            graph.setdefault(imp.dst, set())
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return [_one_cycle(graph, g) for g in groups]


def _one_cycle(graph, group) -> list[str]:
    start = min(group)
    path, seen = [start], {start}
    while True:                         # every module of the group has an edge inside the group
        nxt = sorted(w for w in graph[path[-1]] if w in group)
        back = [w for w in nxt if w in seen]
        if back:
            return path[path.index(back[0]):] + [back[0]]
        path.append(nxt[0])
        seen.add(nxt[0])


def layer_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        if not imp.internal:
            continue
        src, dst = package_of(imp.src), package_of(imp.dst)
        if src not in LAYERS or dst not in LAYERS:
            bad.append(f"{imp.src}:{imp.line} imports {imp.dst}: a package outside the layer order")
        elif src != dst and LAYERS[dst] > LAYERS[src]:
            bad.append(f"{imp.src}:{imp.line} imports {imp.dst} ({dst}, layer {LAYERS[dst]} > {src}, "
                       f"layer {LAYERS[src]}){' (lazy)' if imp.lazy else ''}")
    return bad


def comfy_at_module_level(imports: list[Import]) -> list[str]:
    return [f"{imp.src}:{imp.line} imports {imp.dst} at module level" for imp in imports
            if not imp.internal and not imp.lazy and imp.dst in COMFYUI
            and LAYERS.get(package_of(imp.src), 99) < LAYERS["nodes"]]


def oversized(modules: dict[str, Module]) -> list[str]:
    return [f"{m.path} ({m.lines} lines)" for m in sorted(modules.values(), key=lambda m: -m.lines)
            if m.lines > MAX_LINES and not m.generated]


def unplaced_packages(modules: dict[str, Module]) -> list[str]:
    return sorted({package_of(n) for n in modules} - set(LAYERS))


# ------------------------------------------------------------------------------------- the pack

class Graph(tuple):
    def __repr__(self):                     # keeps pytest's failure report short
        return f"<import graph: {len(self[0])} modules, {len(self[1])} imports>"


@pytest.fixture(scope="module")
def pack():
    return Graph(scan(PACK_ROOT))


def test_the_graph_is_read(pack):
    modules, imports = pack
    internal = [i for i in imports if i.internal]
    assert {"attention", "nodes", "training", "metrics", "references", "files"} <= {package_of(m) for m in modules}
    assert len(internal) > 100, len(internal)
    assert any(package_of(i.src) == "nodes" and package_of(i.dst) == "attention" for i in internal)
    assert any(i.src == ROOT and package_of(i.dst) == "nodes" for i in internal)


def test_every_package_has_a_layer(pack):
    assert unplaced_packages(pack[0]) == []


def test_no_import_cycle(pack):
    cycles = find_cycles(pack[1])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_point_down(pack):
    bad = layer_violations(pack[1])
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_nothing_below_nodes_imports_comfyui_at_module_level(pack):
    bad = comfy_at_module_level(pack[1])
    assert not bad, "ComfyUI imported at module level below nodes/:\n" + "\n".join(bad)


def test_no_module_over_the_size_limit(pack):
    bad = oversized(pack[0])
    assert not bad, f"modules over {MAX_LINES} lines:\n" + "\n".join(bad)


def test_shared_test_code_is_in_helper_modules():
    """conftest.py holds fixtures and set-up, test files hold tests: nothing imports either (shared
    test code goes in a helper module beside them, ARCHITECTURE.md)."""
    bad = conftest_or_test_imports(PACK_ROOT)
    assert not bad, "imports of conftest or of a test module:\n" + "\n".join(bad)


def conftest_or_test_imports(root: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p.startswith(".") or p == "__pycache__" for p in rel.parts[:-1]):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                last = name.split(".")[-1]
                if last == "conftest" or last.startswith("test_"):
                    bad.append(f"{rel}:{node.lineno} imports {name}")
    return bad


# ------------------------------------------------------------------------- the checker, planted faults

def plant(tmp_path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_checker_finds_planted_faults(tmp_path):
    root = plant(tmp_path, {
        "__init__.py": "def entry():\n    from .nodes import ui\n",
        "files/__init__.py": "",
        "files/atomic.py": "import os\n",
        "attention/__init__.py": "",
        "attention/a.py": "from . import b\nfrom ..files import atomic\n",
        "attention/b.py": "def f():\n    from .c import g\n",                         # lazy edge of the cycle
        "attention/c.py": "from personalize_pack.attention.a import x\n",
        "attention/up.py": "def f():\n    from ..training import loop\n",               # lazy, still upward
        "training/__init__.py": "",
        "training/loop.py": "import comfy.sample\n\ndef f():\n    import folder_paths\n",
        "nodes/__init__.py": "",
        "nodes/ui.py": "import comfy\nfrom ..attention import a\n",
        "tools/run.py": "from pack_import import import_pack\nfrom personalize_pack.nodes import ui\n",
        "tools/pack_import.py": "",
        "orphan/gen.py": "from ..files import atomic\n",
        "tests/test_x.py": "from personalize_pack.training import loop\n" + "x = 1\n" * 600,
        "attention/big.py": "x = 1\n" * (MAX_LINES + 1),
        "attention/table.py": "# @generated by tools/x.py\n" + "x = 1\n" * (MAX_LINES + 1),
    })
    modules, imports = scan(root)
    assert "tests.test_x" not in modules
    assert find_cycles(imports) == [["attention.a", "attention.b", "attention.c", "attention.a"]]
    up = layer_violations(imports)
    assert len(up) == 2 and up[0].startswith("attention.up:2 imports training.loop") and "(lazy)" in up[0]
    assert up[1].startswith("orphan.gen:1 imports files.atomic: a package outside the layer order")
    assert comfy_at_module_level(imports) == ["training.loop:1 imports comfy at module level"]
    assert oversized(modules) == [f"{Path('attention/big.py')} ({MAX_LINES + 1} lines)"]
    assert unplaced_packages(modules) == ["orphan"]
    assert conftest_or_test_imports(root) == []
    plant(root, {"tests/test_y.py": "from test_x import helper\n",
                 "tests/integration/test_z.py": "def f():\n    from conftest import PACK_ROOT\n"})
    assert conftest_or_test_imports(root) == [f"{Path('tests/integration/test_z.py')}:2 imports conftest",
                                         f"{Path('tests/test_y.py')}:1 imports test_x"]
    edges = {(i.src, i.dst) for i in imports if i.internal}
    assert {(ROOT, "nodes.ui"), ("tools.run", "tools.pack_import"), ("tools.run", "nodes.ui"),
            ("attention.a", "files.atomic")} <= edges


def test_checker_accepts_a_clean_tree(tmp_path):
    root = plant(tmp_path, {
        "__init__.py": "from .nodes import ui\n",
        "files/__init__.py": "", "files/atomic.py": "import os\n",
        "attention/__init__.py": "from .a import x\n",
        "attention/a.py": "from ..files.atomic import os\nx = 1\n",
        "attention/b.py": "from .a import x\n\ndef f():\n    import comfy.sample\n",
        "nodes/__init__.py": "", "nodes/ui.py": "import comfy\nfrom ..attention import a, b\n",
    })
    modules, imports = scan(root)
    assert find_cycles(imports) == [] and layer_violations(imports) == []
    assert comfy_at_module_level(imports) == [] and oversized(modules) == []
    assert ("nodes.ui", "attention.a") in {(i.src, i.dst) for i in imports}
