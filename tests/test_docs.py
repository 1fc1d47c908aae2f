"""Every documentation reference in the repository resolves, and none points outside it.

Checked: relative links of README.md and docs/*.md (files and ``#section`` anchors), and the
``.md`` files named in docstrings and comments of the package and the benchmarks. Files that
the mentioning code writes (under ``runs/`` or a ``results/`` folder) and names with
placeholders (``<name>.md``, ``{name}.md``, ``*.md``) are outputs, not references.
"""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {"runs", "build", "lightning_logs", "node_modules", "__pycache__"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".txt", ".cfg", ".ini", ".json"}
OUTPUT_DIRS = {"runs", "results"}
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# built from parts, so that this file does not contain what it forbids
FORBIDDEN = ("../" + "shared", "shared/" + "docs", "THEORY" + ".md")

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*)?\)")
FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
MD_NAME = re.compile(r"[\w./<>{}*~-]*\.md(?![\w-])")


def repo_files(suffixes: set[str] | None = None) -> Iterator[Path]:
    """Files of the working tree, without hidden, build, run and cache folders."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(
            d
            for d in dirs
            if not (d.startswith(".") or d in SKIPPED_DIRS or d.endswith(".egg-info"))
        )
        for name in sorted(files):
            path = Path(folder, name)
            if suffixes is None or path.suffix in suffixes:
                yield path


def prose(markdown: str) -> str:
    """Markdown without fenced code blocks and code spans (code is not a link)."""
    return CODE_SPAN.sub("", FENCE.sub("", markdown))


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of the headings of a markdown page."""
    slugs = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        slugs.add(text.replace(" ", "-"))
    return slugs


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file (or heading) does not exist in the repo."""
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no such heading)")
    return broken


def docs_and_comments(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, text)`` of the comments and docstrings (string statements) of a source file."""
    source = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        for number, line in enumerate(source.splitlines(), 1):
            if line.lstrip().startswith("#") and not line.startswith("#!"):
                yield number, line
        return
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        value = node.value if isinstance(node, ast.Expr) else None
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            yield node.lineno, value.value


def is_output(name: str) -> bool:
    return any(c in name for c in "<>{}*") or bool(OUTPUT_DIRS & set(Path(name).parts[:-1]))


def resolves(name: str, source: Path, names: set[str]) -> bool:
    """Whether a mentioned ``.md`` file exists: by path (from the repo root or the mentioning
    file's folder), or for a bare name, anywhere in the repo."""
    if "/" not in name:
        return name in names
    return any((base / name).resolve().is_file() for base in (ROOT, source.parent))


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda page: str(page.relative_to(ROOT)))
def test_markdown_links_resolve(page: Path) -> None:
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_md_files_named_in_docstrings_and_comments_exist() -> None:
    names = {path.name for path in repo_files()}
    sources = [
        path
        for folder in ("resode_lightning", "benchmarks")
        for path in repo_files({".py", ".sh"})
        if path.is_relative_to(ROOT / folder)
    ]
    assert any(path.name == "metrics.py" for path in sources)
    missing = []
    for source in sources:
        for line, text in docs_and_comments(source):
            for name in MD_NAME.findall(text):
                if Path(name).stem and not is_output(name) and not resolves(name, source, names):
                    missing.append(f"{source.relative_to(ROOT)}:{line}: {name}")
    assert not missing, f"docstrings and comments name .md files not in the repo: {missing}"


def test_no_reference_outside_the_repository() -> None:
    found = []
    for path in repo_files(TEXT_SUFFIXES | {""}):
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [f"{path.relative_to(ROOT)}: {bad}" for bad in FORBIDDEN if bad in text]
    assert not found, f"files refer to documents outside the repository: {found}"


def test_theory_doc_covers_what_the_code_cites() -> None:
    sections = anchors(ROOT / "docs" / "theory.md")
    for section in (
        "ode-form",
        "smooth-initialisation",
        "smoothness-metrics",
        "post-activation-blocks-and-the-projected-field",
        "weight-paths",
        "gradients",
        "block-adapters",
        "references",
    ):
        assert section in sections
