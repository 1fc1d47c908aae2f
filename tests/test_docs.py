"""The documentation: its references resolve, its examples run and print what they promise.

Checked: relative links of README.md and docs/*.md (files and ``#section`` anchors), and the
``.md`` files named in docstrings and comments of the package and the benchmarks. Files that
the mentioning code writes (under ``runs/`` or a ``results/`` folder) and names with
placeholders (``<name>.md``, ``{name}.md``, ``*.md``) are outputs, not references. The examples
(docs/snippets, shown verbatim in README.md and included by the docs pages) run, and the numbers
they print are checked; README examples import only public names; the API reference documents
exactly ``resode_lightning.__all__``. ``make docs`` builds the site itself, in strict mode.
"""

from __future__ import annotations

import ast
import io
import math
import os
import re
import runpy
import tokenize
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import resode_lightning

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
    """GitHub's anchors of the headings of a markdown page, and the ids of its API entries
    (``::: resode_lightning.NAME``, rendered by mkdocstrings with that id)."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    slugs = set(re.findall(r"^::: (\S+)$", text, re.MULTILINE))
    for heading in HEADING.findall(text):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        slugs.add(slug.replace(" ", "-"))
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


# --- examples ---------------------------------------------------------------------------------

SNIPPETS = {path.stem: path for path in sorted((ROOT / "docs" / "snippets").glob("*.py"))}
README_SNIPPETS = ("add_callback", "convert_pretrained", "export_neural_ode")
"""The three examples of the README, in the README's order."""
INCLUDE = re.compile(r'^--8<-- "(docs/snippets/[^":]+)(?::(\d+))?"$', re.MULTILINE)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
API_ENTRY = re.compile(r"^::: (\S+)$", re.MULTILINE)


def code_of(snippet: Path) -> tuple[int, str]:
    """The first line (1-based) of a snippet's code, after its docstring, and that code."""
    lines = snippet.read_text(encoding="utf-8").splitlines(keepends=True)
    docstring = ast.parse("".join(lines)).body[0]
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
    start = docstring.end_lineno + 1
    while not lines[start - 1].strip():
        start += 1
    return start, "".join(lines[start - 1 :])


def printed(output: str, prefix: str) -> str:
    """What the line of ``output`` starting with ``prefix`` printed after it."""
    found = [line[len(prefix) :] for line in output.splitlines() if line.startswith(prefix)]
    assert len(found) == 1, f"expected one line starting {prefix!r} in {output!r}"
    return found[0].strip()


def check_add_callback(output: str, names: dict) -> None:
    from resode_lightning import smoothness_report

    logged = ast.literal_eval(output.strip().splitlines()[-1])
    assert list(logged) == ["smoothness/net.layer1/lipschitz"]  # resnet18's one stage
    (row,) = smoothness_report(names["trainer"].lightning_module)
    assert row["stage"] == "net.layer1"
    assert 0 < logged["smoothness/net.layer1/lipschitz"] == round(row["lipschitz"], 3)


def check_convert_pretrained(output: str, names: dict) -> None:
    stages = re.findall(r"Stage\('(\w+)', (\d+) x (\w+), ODE form, horizon=1\)", output)
    assert stages == [
        ("layer1", "2", "Bottleneck"),
        ("layer2", "3", "Bottleneck"),
        ("layer3", "5", "Bottleneck"),
        ("layer4", "2", "Bottleneck"),
    ]
    assert 0 <= float(printed(output, "max relative change of the output:")) < 1e-5


def check_export_neural_ode(output: str, names: dict) -> None:
    assert float(printed(output, "export error")) < 1e-5
    # smooth weights: half the steps changes the function, by a little
    assert 1e-4 < float(printed(output, "half the steps changes the output by")) < 0.05
    assert printed(output, "rk4 with 2 steps per stage:") == "(4, 10)"


def check_timm_zoo(output: str, names: dict) -> None:
    stages = re.findall(r"Stage\('(\w+)', (\d+) x (\w+), plain\)", output)
    assert stages == [
        ("layer1", "3", "BasicBlock"),
        ("layer2", "3", "BasicBlock"),
        ("layer3", "5", "BasicBlock"),
        ("layer4", "2", "BasicBlock"),
    ]
    assert 0 < float(output.strip().splitlines()[-1]) < 1e-5  # not zero: branches are not zero


def check_benchmark_memory(output: str, names: dict) -> None:
    rows = re.findall(r"^\s*(\w+)\s+(\d+) steps:\s+([\d.]+) MiB$", output, re.MULTILINE)
    peak = {(mode, int(steps)): float(mib) for mode, steps, mib in rows}
    assert set(peak) == {(m, n) for m in ("plain", "checkpoint", "adjoint") for n in (4, 16)}
    assert peak["plain", 16] > 2 * peak["plain", 4] > 0  # a ResNet stage stores every state
    assert peak["checkpoint", 16] > peak["checkpoint", 4]
    ratio = float(printed(output, "adjoint peak memory, 16 steps / 4 steps:"))
    assert 0.5 < ratio < 2  # constant in depth
    assert math.isclose(ratio, peak["adjoint", 16] / peak["adjoint", 4], rel_tol=0.05)


CHECKS: dict[str, Callable[[str, dict], None]] = {
    "add_callback": check_add_callback,
    "benchmark_memory": check_benchmark_memory,
    "convert_pretrained": check_convert_pretrained,
    "export_neural_ode": check_export_neural_ode,
    "timm_zoo": check_timm_zoo,
}


def test_every_example_has_its_check() -> None:
    assert set(CHECKS) == set(SNIPPETS)


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_example_prints_what_the_docs_promise(name, tmp_path, monkeypatch, capsys) -> None:
    if name == "timm_zoo":
        pytest.importorskip("timm")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        names = runpy.run_path(str(SNIPPETS[name]), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    CHECKS[name](capsys.readouterr().out, names)


def test_readme_shows_its_three_examples_verbatim() -> None:
    blocks = PYTHON_BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert blocks == [code_of(SNIPPETS[name])[1] for name in README_SNIPPETS], (
        "README.md's python blocks must be docs/snippets/{add_callback,convert_pretrained,"
        "export_neural_ode}.py after their docstrings, in this order"
    )


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_examples_import_only_public_names(name) -> None:
    """README examples import from ``resode_lightning`` itself; the others may also use the
    applications (``resode_lightning.apps``), which the docs present as such."""
    public = set(resode_lightning.__all__)
    for node in ast.walk(ast.parse(SNIPPETS[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
            assert not [m for m in modules if m.startswith("resode_lightning.")], modules
        elif (
            isinstance(node, ast.ImportFrom)
            and (node.module or "").split(".")[0] == "resode_lightning"
        ):
            if node.module == "resode_lightning":
                assert {alias.name for alias in node.names} <= public, ast.unparse(node)
            else:
                assert name not in README_SNIPPETS, f"{name}: {ast.unparse(node)}"
                assert node.module.startswith("resode_lightning.apps."), ast.unparse(node)


def test_docs_pages_include_every_example_after_its_docstring() -> None:
    included = set()
    for page in sorted((ROOT / "docs").glob("*.md")):
        for path, line in INCLUDE.findall(page.read_text(encoding="utf-8")):
            snippet = ROOT / path
            assert snippet.is_file(), f"{page.name} includes {path}, which does not exist"
            start, _ = code_of(snippet)
            assert line == str(start), f"{page.name}: include {path}:{start} (its code)"
            included.add(snippet.stem)
    assert included == set(SNIPPETS), f"examples on no docs page: {set(SNIPPETS) - included}"


# --- the promised API -------------------------------------------------------------------------


def test_the_api_reference_documents_exactly_the_public_names() -> None:
    entries = API_ENTRY.findall((ROOT / "docs" / "api.md").read_text(encoding="utf-8"))
    public = resode_lightning.__all__
    assert len(set(public)) == len(public), "resode_lightning.__all__ repeats a name"
    assert all(hasattr(resode_lightning, name) for name in public)
    assert len(set(entries)) == len(entries), "docs/api.md documents a name twice"
    documented = {entry.removeprefix("resode_lightning.") for entry in entries}
    assert set(public) - documented == set(), "names of __all__ missing from docs/api.md"
    assert documented - set(public) == set(), "docs/api.md documents names not in __all__"
    assert all(entry.startswith("resode_lightning.") for entry in entries)


def test_subpackages_point_to_the_promised_api() -> None:
    """Only the top-level package is promised; each subpackage's docstring says so."""
    for init in sorted((ROOT / "resode_lightning").glob("*/__init__.py")):
        docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        text = " ".join(docstring.split())
        assert "promised API" in text and "top-level" in text, (
            f"{init.relative_to(ROOT)}: say that the promised API is the top-level package"
        )
