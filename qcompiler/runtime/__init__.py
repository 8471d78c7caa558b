"""Beside the backends: the eager runtime (``eager``: quantized modules) and saved checkpoints
(``serialization``)."""
