"""Running an exported graph in onnxruntime (CPU) with the reference backend's arithmetic, and
what this machine's onnxruntime computes exactly.

onnxruntime's CPU int8 GEMM (the ``MatMulIntegerToFloat`` a Q -> DQ -> MatMul unit fuses into)
shifts int8 activations to uint8 (+128, compensated through the weights' column sums) and
multiplies u8 x s8. With VNNI (AVX512-VNNI, AVX-VNNI) or AMX each product is accumulated in
int32: exact. Without (AVX2, AVX-512 without VNNI) ``vpmaddubsw`` adds each pair of adjacent
products along K in int16 with saturation, so a pair beyond +-32767 is clipped (255 * 127 * 2 =
64770 with full-range weights). 7-bit weights (``WeightSpec.reduce_range``, [-64, 63]) keep
every pair within 255 * 64 * 2 = 32640: exact on every x86 CPU. TensorRT's int8 GEMM and
qcompiler's reference kernel are exact either way. ``saturating_u8s8_gemm`` models the saturating kernel;
``check_int8_gemm`` probes which kind this machine has, by running worst-case operands.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["onnxruntime_session", "saturating_u8s8_gemm", "Int8GemmCheck", "check_int8_gemm"]


def onnxruntime_session(path: str | Path | bytes, threads: int | None = None):
    """An onnxruntime CPU session for an exported model (a path or serialized bytes), configured to
    compute like the reference backend.

    - Common-subexpression elimination is off: it would merge the per-GEMM activation Q/DQ
      copies again, and onnxruntime fuses a Q -> DQ -> MatMul unit into its integer GEMM
      (``MatMulIntegerToFloat``, int32 accumulation) only when the pair is not shared. That GEMM
      is exact on CPUs with VNNI or AMX, and everywhere with 7-bit weights (``check_int8_gemm``).
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


def saturating_u8s8_gemm(a_q: np.ndarray, w_q: np.ndarray) -> np.ndarray:
    """``a_q @ w_q`` as onnxruntime's x86 int8 GEMM computes it without VNNI.

    ``a_q`` [M, K] int8 activations (zero-point 0), ``w_q`` [K, N] int8 weights; returns int64
    [M, N]. Each activation becomes ``a + 128`` (uint8); the products of each pair of adjacent
    K positions (0-1, 2-3, ...; an odd K is padded with 0) are summed and saturated to int16,
    the pair sums accumulated exactly, and ``128 * sum_k w`` subtracted (exactly).
    """
    a_q, w_q = np.asarray(a_q), np.asarray(w_q)
    if a_q.dtype != np.int8 or w_q.dtype != np.int8 or a_q.ndim != 2 or w_q.ndim != 2 or a_q.shape[1] != w_q.shape[0]:
        raise ValueError(f"saturating_u8s8_gemm: expected int8 a_q [M, K] and w_q [K, N], got {a_q.dtype} "
                         f"{a_q.shape} and {w_q.dtype} {w_q.shape}")
    a = a_q.astype(np.int64) + 128
    w = w_q.astype(np.int64)
    if a.shape[1] % 2:
        a, w = np.pad(a, ((0, 0), (0, 1))), np.pad(w, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * w[None, 0::2, :] + a[:, 1::2, None] * w[None, 1::2, :]     # [M, K/2, N]
    return np.clip(pairs, -32768, 32767).sum(axis=1) - 128 * w.sum(axis=0)


@dataclass(frozen=True)
class Int8GemmCheck:
    """What this machine's onnxruntime int8 GEMM computed for worst-case operands.

    Attributes:
        exact: full-range int8 weights gave the exact integer GEMM.
        reduced_range_exact: 7-bit weights ([-64, 63], ``WeightSpec.reduce_range``) did.
        pair_saturation: where not exact, the results equal ``saturating_u8s8_gemm``'s (the
            u8 x s8 int16 pair saturation of x86 CPUs without VNNI).
        cpu_flags: the CPU's int8 dot-product features (from /proc/cpuinfo; for messages only).
    """

    exact: bool
    reduced_range_exact: bool
    pair_saturation: bool
    cpu_flags: tuple[str, ...] = ()

    def describe(self) -> str:
        cpu = f" (CPU flags: {', '.join(self.cpu_flags) or 'none of avx2, avx512_vnni, avx_vnni, amx_int8'})"
        if self.exact:
            return "onnxruntime's CPU int8 GEMM is exact on this machine" + cpu
        why = ("it sums pairs of u8 x s8 products in int16 and saturates, as x86 CPUs without VNNI do"
               if self.pair_saturation else "it differs from the exact integer GEMM in a way the u8 x s8 "
               "pair-saturation model does not explain")
        seven = "exact" if self.reduced_range_exact else "NOT exact either"
        return (f"onnxruntime's CPU int8 GEMM is not exact on this machine with full-range int8 weights: {why}"
                f"{cpu}; with 7-bit weights (weight.reduce_range) it is {seven}")


_PROBE_K = 64


def _probe_operands() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations [M, K], full-range weights [K, N] and 7-bit weights [K, N], all int8: constant
    and alternating extremes (the largest pair sums of either sign) plus random values."""
    k = _PROBE_K
    rng = np.random.default_rng(0)

    def columns(hi: int, lo: int) -> np.ndarray:
        cols = [np.full(k, hi), np.full(k, lo), np.tile([hi, lo], k // 2), np.tile([lo, hi], k // 2),
                rng.integers(lo, hi + 1, k)]
        return np.stack(cols, axis=1).astype(np.int8)

    alt = np.tile([127, -128], k // 2)
    rows = [np.full(k, 127), np.full(k, -128), alt, np.full(k, 1), rng.integers(-128, 128, k)]
    return np.stack(rows).astype(np.int8), columns(127, -128), columns(63, -64)


def _probe_model(w_q: np.ndarray):
    """``x -> QuantizeLinear -> DequantizeLinear -> MatMul(., DequantizeLinear(w_q, axis=1))`` with
    scales 1 and zero-points 0: the exporter's INT8 GEMM unit, whose float output is the integer GEMM."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = w_q.shape
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "s_x"), numpy_helper.from_array(np.array(0, np.int8), "z_x"),
             numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(np.ones(n, np.float32), "s_w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_x", "z_x"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "s_x", "z_x"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "s_w"], ["w_dq"], axis=1),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"])]
    graph = helper.make_graph(nodes, "int8_gemm_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _cpu_flags() -> tuple[str, ...]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return tuple(f for f in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags)


@functools.cache
def check_int8_gemm() -> Int8GemmCheck:
    """Probe this machine's onnxruntime int8 GEMM (through ``onnxruntime_session``, as the exported
    graphs run) with worst-case operands, batched and one row at a time; cached per process.

    The verdict comes from the results, not from the CPU's name: compare each with the exact
    integer GEMM, and the inexact ones with ``saturating_u8s8_gemm``.
    """
    a_q, w_full, w_7bit = _probe_operands()
    x = a_q.astype(np.float32)
    exact, model_matches = {}, True
    for name, w_q in (("full", w_full), ("7bit", w_7bit)):
        sess = onnxruntime_session(_probe_model(w_q).SerializeToString())
        got = np.concatenate([sess.run(None, {"x": x})[0], *(sess.run(None, {"x": row[None]})[0] for row in x)])
        got = got.astype(np.int64)
        want = np.concatenate([a_q.astype(np.int64) @ w_q.astype(np.int64)] * 2)
        exact[name] = bool(np.array_equal(got, want))
        if not exact[name]:
            model_matches &= bool(np.array_equal(got, np.concatenate([saturating_u8s8_gemm(a_q, w_q)] * 2)))
    return Int8GemmCheck(exact["full"], exact["7bit"], not exact["full"] and model_matches, _cpu_flags())
