"""Running an exported graph in onnxruntime (CPU) with the reference backend's arithmetic."""

from __future__ import annotations

from pathlib import Path

__all__ = ["onnxruntime_session"]


def onnxruntime_session(path: str | Path | bytes, threads: int | None = None):
    """An onnxruntime CPU session for an exported model (a path or serialized bytes), configured to
    compute like the reference backend.

    - Common-subexpression elimination is off: it would merge the per-GEMM activation Q/DQ
      copies again, and onnxruntime fuses a Q -> DQ -> MatMul unit into its integer GEMM
      (``MatMulIntegerToFloat``, exact int32 accumulation) only when the pair is not shared.
    - ``session.qdq_matmulnbits_accuracy_level`` is 0: INT4 DQ + MatMul fuses into
      ``MatMulNBits``, which by default (level 4) quantizes activations to int8.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads is not None:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["CommonSubexpressionElimination"])
