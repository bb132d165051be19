"""Selection over a finished run: Lightly's selection_config (see docs/selection.md)."""
