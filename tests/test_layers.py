"""The folder layout is the architecture: each layer imports only the layers below it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "resode_lightning"
ALLOWED = {
    "core": {"core"},
    "export": {"core", "export"},
    "lit": {"core", "lit", "_lightning"},
    "data": {"core", "data", "_lightning"},
    "callbacks": {"core", "export", "callbacks", "_lightning"},
}
LIGHTNING = ("pytorch_lightning", "lightning")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "resode_lightning" and len(parts) > 1:
                assert parts[1] in ALLOWED[layer], f"{path.relative_to(PACKAGE)} imports {name}"


@pytest.mark.parametrize("layer", ["core", "export"])
def test_core_and_export_know_no_lightning(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _imports(path):
            assert not name.startswith(LIGHTNING), f"{path.relative_to(PACKAGE)} imports {name}"
