"""The documentation stays in step with the code (no ComfyUI, no torch needed):

* every node id declared in nodes/ has its help page ``web/docs/<node id>.md`` (what ComfyUI's node help
  panel shows), non-empty, and no page names an unknown id;
* the web folder that holds those pages is the one ``__init__.py`` (``WEB_DIRECTORY``) and
  ``pyproject.toml`` (``[tool.comfy] web``) register;
* every ``docs/<file>.md`` the code cites exists, and every section it cites (``§N`` / ``§N.M``) is a
  heading of that file;
* README.md stays short (at most 330 lines) and names every node id.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "web" / "docs"
SKIP_DIRS = {".git", ".venv", ".venv-comfyui", "web", "node_modules", "__pycache__"}

NODE_ID = re.compile(r"""node_id\s*=\s*["'](\w+)["']""")
# a citation: docs/<file>.md (not web/docs/...), or a section sign with a number or a range of them
CITATION = re.compile(r"(?<![\w/.-])docs/([\w-]+\.md)|§\s*(\d+(?:\.\d+)?)(?:\s*[-–]\s*(\d+(?:\.\d+)?))?")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)?)\.?(?:\s|$)", re.M)


def node_ids() -> set[str]:
    ids = set()
    for path in sorted((ROOT / "nodes").rglob("*.py")):
        ids.update(NODE_ID.findall(path.read_text(encoding="utf-8")))
    return ids


def source_files() -> list[Path]:
    here = Path(__file__).resolve()
    return [p for p in sorted(ROOT.rglob("*.py"))
            if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts) and p.resolve() != here]


def citations() -> list[tuple[str, str, str | None]]:
    """``(where, doc file, section or None)`` for every citation in the code. A bare ``§N`` belongs to
    the last ``docs/<file>.md`` cited before it in the same file; before any, to no file in particular."""
    found = []
    for path in source_files():
        text = path.read_text(encoding="utf-8")
        current = None
        for m in CITATION.finditer(text):
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            if m.group(1):
                current = m.group(1)
                found.append((where, current, None))
            else:
                for section in filter(None, (m.group(2), m.group(3))):
                    found.append((where, current, section))
    return found


def sections(doc: Path) -> set[str]:
    return set(HEADING.findall(doc.read_text(encoding="utf-8")))


def test_the_nodes_are_found():
    ids = node_ids()
    assert len(ids) >= 20, ids
    assert "PersonalizeMultiReferenceAttention" in ids


@pytest.mark.parametrize("node_id", sorted(node_ids()))
def test_every_node_has_a_help_page(node_id):
    page = PAGES / f"{node_id}.md"
    assert page.is_file(), f"web/docs/{node_id}.md is missing"
    text = page.read_text(encoding="utf-8")
    assert text.strip(), f"web/docs/{node_id}.md is empty"
    assert text.lstrip().startswith("# "), f"web/docs/{node_id}.md should open with its title"


def test_no_help_page_for_an_unknown_node():
    extra = sorted(p.stem for p in PAGES.glob("*.md") if p.stem not in node_ids())
    assert not extra, f"help pages without a node: {extra}"
    assert not [p for p in PAGES.iterdir() if p.suffix != ".md"], "web/docs/ holds only <node id>.md pages"


def test_the_web_folder_is_registered():
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    values = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == "WEB_DIRECTORY" for t in node.targets)
              and isinstance(node.value, ast.Constant)]
    assert values, "__init__.py sets no WEB_DIRECTORY"
    assert (ROOT / values[0]).resolve() == PAGES.parent.resolve()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    comfy = pyproject.split("[tool.comfy]", 1)[1].split("\n[", 1)[0]
    web = re.search(r'^web\s*=\s*"([^"]+)"', comfy, re.M)
    if web:  # optional, but when set it names the same folder
        assert (ROOT / web.group(1)).resolve() == PAGES.parent.resolve()


def test_the_code_cites_docs_that_exist():
    cites = citations()
    assert any(doc == "algorithms.md" for _, doc, _ in cites), "no citation found: is the pattern right?"
    missing = sorted({f"{where}: docs/{doc}" for where, doc, _ in cites if doc and not (ROOT / "docs" / doc).is_file()})
    assert not missing, "cited files not in docs/:\n" + "\n".join(missing)


def test_every_cited_section_is_a_heading():
    docs = {p.name: sections(p) for p in (ROOT / "docs").glob("*.md")}
    everywhere = set().union(*docs.values()) if docs else set()
    bad = []
    for where, doc, section in citations():
        if section is None:
            continue
        have = docs.get(doc, set()) if doc else everywhere
        if section not in have:
            bad.append(f"{where}: {'docs/' + doc if doc else 'docs/'} §{section}")
    assert not bad, "cited sections that are not headings:\n" + "\n".join(bad)


def test_the_readme_is_short_and_names_every_node():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 330
    missing = sorted(n for n in node_ids() if n not in text)
    assert not missing, f"README.md does not name {missing}"


def test_the_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)[^)]*\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert local, "the node index links to the help pages"
    missing = sorted(t for t in local if not (ROOT / t).exists())
    assert not missing, f"README.md links to missing files: {missing}"
