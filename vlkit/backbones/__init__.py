"""Backbones: one interface over open_clip, transformers CLIP and the built-in tiny CLIP."""
