"""The folder layout is the architecture: each layer imports only the layers below it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "resode_lightning"
ALLOWED = {
    "testing": set(),
    "core": {"core"},
    "export": {"core", "export"},
    "memory_benchmark": {"core", "export"},
    "lit": {"core", "lit", "_lightning"},
    "data": {"core", "data", "_lightning"},
    "callbacks": {"core", "export", "callbacks", "_lightning"},
}
"""Each layer (a folder, or a module at the package's top) and the layers it may import."""
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
                assert parts[1] in ALLOWED[layer], f"{path.relative_to(PACKAGE)} imports {name}"


@pytest.mark.parametrize("layer", ["testing", "core", "export", "memory_benchmark"])
def test_core_and_export_know_no_lightning(layer):
    for path in _files(layer):
        for name in _imports(path):
            assert not name.startswith(LIGHTNING), f"{path.relative_to(PACKAGE)} imports {name}"
