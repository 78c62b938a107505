"""The built-in export plugin: registers the `onnx` target through the same hook third parties use.

A third-party package adds a target from its own plugin module (entry point group "vlkit"):

    from vlkit.hookspecs import hookimpl

    @hookimpl
    def register_exporters(register):
        register("tflite", TFLiteExporter(), "TensorFlow Lite flat buffers")

where the exporter subclasses `vlkit.export.base.Exporter`; `vlkit export --target tflite` then uses it.
"""

from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def register_exporters(register):
    from .onnx_export import OnnxExporter

    exporter = OnnxExporter()
    register(exporter.name, exporter, exporter.summary)
