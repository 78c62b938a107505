"""Tasks: each owns its head, loss and metrics (classification, retrieval, vqa, grounding, plugins)."""
