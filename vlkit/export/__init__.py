"""Export a backbone with its adapters for deployment without PyTorch (`vlkit export`).

>>> from vlkit.export import export_model
>>> summary = export_model("out/", backbone="tiny", adapters=["runs/med"], task="classification")

See `vlkit.export.base` for the exporter interface a third-party target implements, `vlkit.export.api`
for the driver, `vlkit.export.onnx_export` for the built-in ONNX target and `vlkit.export.verify` for the
onnxruntime checks.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("export_model", "get_exporter"):
        from . import api

        return getattr(api, name)
    if name in ("Exporter", "ExportOptions", "ExportRequest", "ExportResult", "GraphSpec", "Check"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module 'vlkit.export' has no attribute {name!r}")
