"""Adapters: injection core, variant interface, built-in variants (bottleneck, LoRA), files and reports."""
