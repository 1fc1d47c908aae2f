"""Griffe extension for the API reference: the package's reST markup, read as Markdown.

Docstrings cite objects with Sphinx roles (:func:`~resode_lightning.set_steps`) and open
literal blocks with ``::``. A role naming a public name (one of ``resode_lightning.__all__``)
becomes a link to its entry in the API reference; any other role becomes inline code, so that
internal modules can move without breaking the docs build. A trailing ``::`` becomes ``:``
(the indented block after it is already code in Markdown).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc|obj):`(~?)([\w.]+)`")
LITERAL_BLOCK = re.compile(r"::$", re.MULTILINE)
INIT = Path(__file__).resolve().parents[1] / "resode_lightning" / "__init__.py"


def public_names() -> set[str]:
    """``resode_lightning.__all__``, read from the source (the package is not imported)."""
    for node in ast.parse(INIT.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            return set(ast.literal_eval(node.value))
    raise ValueError(f"{INIT} defines no __all__")


class ReSTRoles(griffe.Extension):
    """Rewrite the reST roles and literal-block markers of every docstring as Markdown."""

    def __init__(self) -> None:
        super().__init__()
        self.public = public_names()

    def _markdown(self, match: re.Match[str]) -> str:
        short, path = match.groups()
        name = path.rsplit(".", 1)[-1]
        shown = name if short else path
        if name in self.public:
            return f"[`{shown}`][resode_lightning.{name}]"
        return f"`{shown}`"

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = ROLE.sub(self._markdown, obj.docstring.value)
            obj.docstring.value = LITERAL_BLOCK.sub(":", text)
