"""The folder layout is the architecture: each layer imports only the layers below it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "resode_lightning"
ALLOWED = {
    "testing": set(),
    "core/io": {"core/io"},
    "core": {"core"},
    "export": {"core", "export"},
    "apps/memory_benchmark": {"core", "export"},
    "lit": {"core", "export", "callbacks", "lit", "_lightning"},
    "data": {"core", "data", "_lightning"},
    "callbacks": {"core", "export", "callbacks", "_lightning"},
}
"""Each layer (a folder or a module, by its path in the package) and the layers it may import."""
LIGHTNING = ("pytorch_lightning", "lightning")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files(layer: str) -> list[Path]:
    module = PACKAGE / f"{layer}.py"
    return [module] if module.is_file() else sorted((PACKAGE / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below(layer):
    files = _files(layer)
    assert files, f"no layer {layer!r} in the package"
    for path in files:
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "resode_lightning" and len(parts) > 1:
                target = "/".join(parts[1:])
                allowed = any(target == a or target.startswith(f"{a}/") for a in ALLOWED[layer])
                assert allowed, f"{path.relative_to(PACKAGE)} imports {name}"


@pytest.mark.parametrize("layer", ["testing", "core", "export", "apps/memory_benchmark"])
def test_core_and_export_know_no_lightning(layer):
    for path in _files(layer):
        for name in _imports(path):
            assert not name.startswith(LIGHTNING), f"{path.relative_to(PACKAGE)} imports {name}"


def _torch_loads(path: Path) -> list[int]:
    """The lines of ``path`` that call ``torch.load`` (or import ``load`` from torch)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            lines += [node.lineno for alias in node.names if alias.name == "load"]
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in (
            "torch.load",
            "torch.serialization.load",
        ):
            lines.append(node.lineno)
    return lines


def test_the_only_torch_load_is_the_safe_readers():
    """Every checkpoint the package reads goes through the size checks of the safe reader."""
    calls = {
        str(path.relative_to(PACKAGE)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := _torch_loads(path))
    }
    assert list(calls) == ["core/io/checkpoint.py"] and len(calls["core/io/checkpoint.py"]) == 1, (
        f"torch.load outside the safe reader: {calls}"
    )


def test_modules_stay_small():
    """One idea a module: none of the package over 450 lines."""
    sizes = {path: len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    large = {str(p.relative_to(PACKAGE)): n for p, n in sizes.items() if n > 450}
    assert not large, f"modules over 450 lines: {large}"
