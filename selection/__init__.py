"""Lightly's selection over pretag's predictions and vectors; ``select`` for arrays."""

from pretag.selection.api import select

__all__ = ["select"]
