"""The docs site: every kind sfdiag can print has its anchor, every page exists, it builds.

The table's advice sentences point at ``docs/verdicts.md#<kind>``, so every optimizer
verdict, fingerprint, logged-metric verdict (gradient norms and learning rates share one
list) and finding kind must have a heading there with that exact anchor (``{#post-step}``).
The kinds are read from the code, never listed here: ``VERDICTS``, ``METRIC_VERDICTS`` and
``FINDING_KINDS`` of ``sfdiag.results``; the fingerprints from ``FINGERPRINTS`` there where it
exists, else from ``sfdiag.step_audit.verdict`` (every name its ``fingerprint`` function returns and
every key of its advice table).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
VERDICTS_PAGE = DOCS / "verdicts.md"
MKDOCS_YML = REPO / "mkdocs.yml"

# a heading line ending in an attr_list anchor: "### post-step {#post-step}"
_ANCHORED_HEADING = re.compile(r"^#{1,6} [^\n]*\{#([A-Za-z0-9_.:-]+)\}[ \t]*$", re.MULTILINE)
_FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _fingerprints() -> set[str]:
    from sfdiag import results

    declared = getattr(results, "FINGERPRINTS", None)
    if declared is not None:
        return set(declared)
    from sfdiag.step_audit import verdict

    tree = ast.parse(inspect.getsource(verdict.fingerprint))
    returned = {
        node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Return)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }
    return returned | set(verdict._ADVICE)


def _kinds() -> dict[str, set[str]]:
    from sfdiag import results

    return {
        "optimizer verdict": set(results.VERDICTS),
        "fingerprint": _fingerprints(),
        "logged-metric verdict": set(results.METRIC_VERDICTS),
        "finding": set(results.FINDING_KINDS),
    }


def _anchors() -> list[str]:
    text = VERDICTS_PAGE.read_text(encoding="utf-8")
    return _ANCHORED_HEADING.findall(_FENCED.sub("", text))


def _nav_pages(node: object) -> list[str]:
    if isinstance(node, str):
        return [node] if node.endswith(".md") else []
    if isinstance(node, dict):
        return [page for value in node.values() for page in _nav_pages(value)]
    if isinstance(node, list):
        return [page for item in node for page in _nav_pages(item)]
    return []


def _nav() -> list[str]:
    config = yaml.safe_load(MKDOCS_YML.read_text(encoding="utf-8"))
    return _nav_pages(config["nav"])


def test_the_kinds_are_read_from_the_code():
    kinds = _kinds()
    for family, names in kinds.items():
        assert names, f"no {family} found in the code"
        assert all(isinstance(n, str) and n for n in names), (family, names)
    # the four families the page explains, as the code spells a few of them
    assert "mutated" in kinds["optimizer verdict"]
    assert "adam-normalized" in kinds["fingerprint"]
    assert "post-step" in kinds["logged-metric verdict"]
    assert "scheduler-on-skipped-step" in kinds["finding"]


FAMILIES = ["optimizer verdict", "fingerprint", "logged-metric verdict", "finding"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kind_has_its_anchor_on_the_verdicts_page(family):
    anchors = set(_anchors())
    missing = sorted(_kinds()[family] - anchors)
    assert not missing, (
        f"docs/verdicts.md has no heading anchored {{#kind}} for these {family} kinds: "
        f"{missing}; add e.g. '### {missing[0]} {{#{missing[0]}}}' with what it means, "
        "an example and the fix"
    )


def test_anchors_are_unique_and_each_kind_says_what_it_means_an_example_and_the_fix():
    anchors = _anchors()
    duplicated = sorted({a for a in anchors if anchors.count(a) > 1})
    assert not duplicated, f"anchors given twice in docs/verdicts.md: {duplicated}"
    text = VERDICTS_PAGE.read_text(encoding="utf-8")
    # headings outside code blocks ("# a comment" in a Python block is not one)
    prose = _FENCED.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)
    starts = [m.start() for m in re.finditer(r"^#{1,3} ", prose, re.MULTILINE)]
    kinds = set().union(*_kinds().values())
    for heading in _ANCHORED_HEADING.finditer(prose):
        if heading.group(1) not in kinds:
            continue
        end = next((start for start in starts if start > heading.start()), len(text))
        section = text[heading.end() : end]
        for part in ("**Means.**", "**Example", "**Fix.**"):
            assert part in section, f"docs/verdicts.md#{heading.group(1)} lacks {part}"


def test_every_page_in_the_nav_exists_and_every_page_is_in_the_nav():
    nav = _nav()
    assert nav, "mkdocs.yml has no nav"
    assert "verdicts.md" in nav
    missing = [page for page in nav if not (DOCS / page).is_file()]
    assert not missing, f"pages in mkdocs.yml's nav that docs/ lacks: {missing}"
    assert len(nav) == len(set(nav)), f"a page listed twice in the nav: {nav}"
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    left_out = sorted(set(pages) - set(nav))
    assert not left_out, f"docs/ pages not in mkdocs.yml's nav: {left_out}"


def _docs_tools_missing() -> str | None:
    for module, package in (
        ("mkdocs", "mkdocs"),
        ("material", "mkdocs-material"),
        ("mkdocstrings", "mkdocstrings"),
        ("mkdocstrings_handlers.python", "mkdocstrings-python"),
    ):
        try:
            found = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            found = None
        if found is None:
            return f"{package} is not installed (pip install -e '.[docs]', or make docs)"
    return None


def test_the_site_builds_with_strict(tmp_path):
    missing = _docs_tools_missing()
    if missing:
        pytest.skip(f"docs build not checked: {missing}")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(MKDOCS_YML)]
        + ["-d", str(site)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}\n{built.stderr}"
    page = (site / "verdicts" / "index.html").read_text(encoding="utf-8")
    for kind in sorted(set().union(*_kinds().values())):
        assert f'id="{kind}"' in page, f"the built verdicts page has no anchor #{kind}"
    assert (site / "api" / "index.html").is_file()


# ---- the README: a front page that points into docs/ and shows the package's layout ----------
README = REPO / "README.md"
PACKAGE = REPO / "sfdiag"
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _layout_block(text: str, heading: str) -> str:
    """The first ```text block under ``heading`` (a "## ..." line)."""
    section = text.split(f"\n{heading}\n", 1)[1]
    return section.split("```text\n", 1)[1].split("\n```", 1)[0]


def _public_modules() -> list[Path]:
    """Every module of the package a reader may look for: no ``_private`` ones."""
    return sorted(
        path.relative_to(PACKAGE)
        for path in PACKAGE.rglob("*.py")
        if not path.name.startswith("_") and "__pycache__" not in path.parts
    )


def test_the_readme_is_a_front_page_whose_links_resolve():
    text = README.read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= 200, f"README.md has {lines} lines: move detail into a docs/ page"
    links = [link.split("#", 1)[0] for link in _LINK.findall(text)]
    local = [link for link in links if link and "://" not in link]
    assert "docs/verdicts.md" in local and "docs/run.md" in local
    missing = sorted({link for link in local if not (REPO / link).exists()})
    assert not missing, f"README.md links to files that do not exist: {missing}"
    # every page of the site is reachable from the front page
    unlinked = sorted(set(_nav()) - {link.removeprefix("docs/") for link in local})
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_readme_layout_is_drawn_from_the_tree():
    block = _layout_block(README.read_text(encoding="utf-8"), "## Layout")
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*(?:\.py|/)?", block))
    subpackages = sorted(p.parent.name + "/" for p in PACKAGE.glob("*/__init__.py"))
    modules = sorted(
        p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")
    )
    left_out = [name for name in subpackages + modules if name not in words]
    assert not left_out, f"README.md's Layout does not name {left_out}"
    named = {w for w in words if w.endswith((".py", "/")) and w != "sfdiag/"}
    found = {p.name for p in PACKAGE.rglob("*.py")} | {
        p.name + "/" for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__"
    }
    gone = sorted(named - found)
    assert not gone, f"README.md's Layout names what sfdiag/ lacks: {gone}"


def test_the_architecture_page_names_every_public_module():
    block = _layout_block((DOCS / "architecture.md").read_text(encoding="utf-8"), "## Layout")
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", block))
    left_out = [str(path) for path in _public_modules() if path.stem not in words]
    assert not left_out, f"docs/architecture.md's Layout does not name {left_out}"
