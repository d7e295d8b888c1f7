"""Exporters from training frameworks to the toolchain's ONNX input."""

from exporters.onnx_export import ExportError, apply_preprocess, export_onnx, preprocess_spec

__all__ = ["ExportError", "apply_preprocess", "export_onnx", "preprocess_spec"]
