"""ONNX QDQ export for TensorRT (issue 6)."""
