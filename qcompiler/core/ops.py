"""qcompiler's graph ops, declared once as ``torch.library`` custom ops with fake kernels.

Graphs carry them as ordinary ops, so they trace, compile and export:

- ``qcompiler::quantize(x, scale, zero_point, dtype, block_size=0)`` /
  ``qcompiler::dequantize(q, scale, zero_point, out_dtype, block_size=0)`` (block_size: ONNX's, 0 = none)
- ``qcompiler::quantize_per_token(x, dtype) -> (x_q, scale)`` (dynamic, symmetric)
- ``qcompiler::int8_gemm`` / ``qcompiler::fp8_gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype)``
- ``qcompiler::weight_only_gemm(x, w_q, w_scale, w_zero, bias, group_size=0)``
- packed INT4 (layout in ``qcompiler.core.packing``): ``qcompiler::dequantize_int4(w_packed, w_scale, w_zero,
  group_size, in_features, out_dtype)``, ``qcompiler::int4_gemm(x, w_packed, w_scale, w_zero, bias,
  group_size, in_features)`` (W4A16) and ``qcompiler::w4a8_gemm(a_q, a_scale, w_packed, w_scale, w_zero,
  bias, group_size, in_features, out_dtype)`` (INT4 weights, FP8 or INT8 activations: ``a_q``'s dtype)
- ``qcompiler::onednn_int8_mm(a_q, w_packed, n)`` and ``qcompiler::onednn_linear(x, w, bias)``: the
  oneDNN cores of CPU kernel choices (``qcompiler.backends.gemm_kernels``)
- ``qcompiler::norm_quantize_per_token(x, norm, weight, bias, eps, smooth, dtype, norm_dtype, mul_dtype,
  out_dtype) -> (x_q, scale)``: a norm, an unfolded SmoothQuant scale and dynamic per-token quantization
  as one op (written by ``passes/fuse_norm_quant.py`` for target "triton"; math below)
- ``qcompiler::hadamard_transform(x, h_block, scale)``: an orthogonal Hadamard rotation along x's last dim,
  ``scale * (h_block kron H_p) x`` (QuaRot's online transform; math in ``reference_kernels.hadamard_transform_ref``)
- ``qcompiler::kv_cache_read(codes, scale, zero, dtype, head_dim, out_dtype, group=0, rotation=None, center=None)``:
  the keys or values a quantized KV cache holds (``qcompiler.runtime.kv_cache``; layout in ``qcompiler.core.kv_format``)
- ``qcompiler::triton_<op>(<op's arguments>, *, int report_id=0)`` for each op in ``TRITON_KERNEL_OPS``:
  the op computed by its Triton kernel. Same schema and fake kernel as ``<op>`` plus ``report_id``
  (the compile report that records run-time fallbacks, 0 = none); the CPU and CUDA kernels are
  registered by ``qcompiler.backends.triton.lowering`` (CPU: Triton's interpreter), and calling one
  before that raises.

The CPU/GPU kernels of the other ops are the pure-torch references in ``qcompiler.core.reference_kernels``.

``norm_quantize_per_token`` computes, for x [..., K]:

- ``norm="rms"``: ``n = h * rsqrt(mean(h**2, -1) + eps)`` with ``h = x.float()``; ``n`` is rounded to
  ``norm_dtype``, multiplied by ``weight`` (rounded to ``mul_dtype``), then cast to ``out_dtype`` — the
  casts of HF's RMSNorm variants (Llama: ``w * n.to(x.dtype)``; Gemma: ``(n * (1 + w.float())).type_as(x)``),
  which are no-ops in float32 models;
- ``norm="layer"``: ``layer_norm(x, [K], weight, bias, eps)`` cast to ``out_dtype``;
- ``norm="none"``: ``x``;

then ``y * smooth`` when ``smooth`` (float32 [K], the inverse SmoothQuant scale) is given, and
``numerics.quantize_per_token(y, dtype)``: ``scale = max|y| / qmax`` per row (float32 [..., 1]),
``x_q = saturate(round_half_even(y / scale))`` in int8 or fp8 e4m3.
"""

from __future__ import annotations

import torch

from qcompiler.core import kv_format, numerics
from qcompiler.core import reference_kernels as ref

__all__ = ["quantize", "dequantize", "quantize_per_token", "int8_gemm", "fp8_gemm", "weight_only_gemm",
           "dequantize_int4", "int4_gemm", "w4a8_gemm", "onednn_int8_mm", "onednn_linear",
           "norm_quantize_per_token", "hadamard_transform", "kv_cache_read", "GEMM_OPS", "QDQ_OPS", "TRITON_KERNEL_OPS", "triton_op"]

_LIB = "qcompiler"


@torch.library.custom_op(f"{_LIB}::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, dtype: str,
             block_size: int = 0) -> torch.Tensor:
    return ref.quantize_ref(x, scale, zero_point, dtype, block_size)


@quantize.register_fake
def _(x, scale, zero_point, dtype, block_size=0):
    return torch.empty_like(x, dtype=numerics.STORAGE_DTYPE[dtype])


@torch.library.custom_op(f"{_LIB}::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               out_dtype: torch.dtype, block_size: int = 0) -> torch.Tensor:
    return ref.dequantize_ref(q, scale, zero_point, out_dtype, block_size)


@dequantize.register_fake
def _(q, scale, zero_point, out_dtype, block_size=0):
    return torch.empty_like(q, dtype=out_dtype)


@torch.library.custom_op(f"{_LIB}::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    return numerics.quantize_per_token(x, dtype)


@quantize_per_token.register_fake
def _(x, dtype):
    return (torch.empty_like(x, dtype=numerics.STORAGE_DTYPE[dtype]),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


def _gemm_fake(a_q, a_scale, w_q, w_scale, bias, out_dtype):
    return a_q.new_empty((*a_q.shape[:-1], w_q.shape[0]), dtype=out_dtype)


@torch.library.custom_op(f"{_LIB}::int8_gemm", mutates_args=())
def int8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return ref.int8_gemm_ref(a_q, a_scale, w_q, w_scale, bias, out_dtype)


int8_gemm.register_fake(_gemm_fake)


@torch.library.custom_op(f"{_LIB}::fp8_gemm", mutates_args=())
def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return ref.fp8_gemm_ref(a_q, a_scale, w_q, w_scale, bias, out_dtype)


fp8_gemm.register_fake(_gemm_fake)


@torch.library.custom_op(f"{_LIB}::weight_only_gemm", mutates_args=())
def weight_only_gemm(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
                     bias: torch.Tensor | None, group_size: int = 0) -> torch.Tensor:
    return ref.weight_only_gemm_ref(x, w_q, w_scale, w_zero, bias, group_size or None)


@weight_only_gemm.register_fake
def _(x, w_q, w_scale, w_zero, bias, group_size=0):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@torch.library.custom_op(f"{_LIB}::dequantize_int4", mutates_args=())
def dequantize_int4(w_packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, group_size: int,
                    in_features: int, out_dtype: torch.dtype) -> torch.Tensor:
    return ref.dequantize_int4_ref(w_packed, w_scale, w_zero, group_size, in_features, out_dtype)


@dequantize_int4.register_fake
def _(w_packed, w_scale, w_zero, group_size, in_features, out_dtype):
    return w_packed.new_empty((w_packed.shape[0], in_features), dtype=out_dtype)


@torch.library.custom_op(f"{_LIB}::int4_gemm", mutates_args=())
def int4_gemm(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
              bias: torch.Tensor | None, group_size: int, in_features: int) -> torch.Tensor:
    return ref.int4_gemm_ref(x, w_packed, w_scale, w_zero, bias, group_size, in_features)


@int4_gemm.register_fake
def _(x, w_packed, w_scale, w_zero, bias, group_size, in_features):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


@torch.library.custom_op(f"{_LIB}::w4a8_gemm", mutates_args=())
def w4a8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
              w_zero: torch.Tensor | None, bias: torch.Tensor | None, group_size: int, in_features: int,
              out_dtype: torch.dtype) -> torch.Tensor:
    return ref.w4a8_gemm_ref(a_q, a_scale, w_packed, w_scale, w_zero, bias, group_size, in_features, out_dtype)


@w4a8_gemm.register_fake
def _(a_q, a_scale, w_packed, w_scale, w_zero, bias, group_size, in_features, out_dtype):
    return a_q.new_empty((*a_q.shape[:-1], w_packed.shape[0]), dtype=out_dtype)


_ONEDNN_UNIT: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


@torch.library.custom_op(f"{_LIB}::onednn_int8_mm", mutates_args=())
def onednn_int8_mm(a_q: torch.Tensor, w_packed: torch.Tensor, n: int) -> torch.Tensor:
    """int8 [M, K] x oneDNN-prepacked int8 weight -> the int32 sums as float32 [M, N].

    oneDNN's u8s8 int8 GEMM: ``a_q + 128`` (the sign bit flipped) as uint8 with zero-point 128,
    unit scales. Exact where the CPU sums int8 products exactly (VNNI / AMX); without VNNI the
    products are summed in int16 pairs that can saturate (``qcompiler.backends.gemm_kernels``).
    """
    unit = _ONEDNN_UNIT.get((n, a_q.device))
    if unit is None:
        unit = _ONEDNN_UNIT[(n, a_q.device)] = (torch.ones(n, device=a_q.device),
                                                torch.zeros(n, dtype=torch.long, device=a_q.device))
    a_u8 = a_q.view(torch.uint8) ^ 128
    return torch.ops.onednn.qlinear_pointwise(a_u8, 1.0, 128, w_packed, unit[0], unit[1], None, 1.0, 0,
                                              torch.float32, "none", [], "")


@onednn_int8_mm.register_fake
def _(a_q, w_packed, n):
    return a_q.new_empty((a_q.shape[0], n), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T + bias`` on oneDNN's float GEMM (``torch.ops.mkldnn._linear_pointwise``), in x's dtype.

    Same products and float32 sums as ``F.linear``, another summation order; on some CPUs much
    faster than the BLAS ``F.linear`` calls (MKL on AMD EPYC runs its AVX2 path).
    """
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), w.contiguous(), bias,
                                             "none", [], "")
    return out.reshape(*x.shape[:-1], w.shape[0])


@onednn_linear.register_fake
def _(x, w, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op(f"{_LIB}::norm_quantize_per_token", mutates_args=())
def norm_quantize_per_token(x: torch.Tensor, norm: str, weight: torch.Tensor | None, bias: torch.Tensor | None,
                            eps: float, smooth: torch.Tensor | None, dtype: str, norm_dtype: torch.dtype,
                            mul_dtype: torch.dtype, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return ref.norm_quantize_per_token_ref(x, norm, weight, bias, eps, smooth, dtype, norm_dtype, mul_dtype,
                                           out_dtype)


@norm_quantize_per_token.register_fake
def _(x, norm, weight, bias, eps, smooth, dtype, norm_dtype, mul_dtype, out_dtype):
    return (torch.empty_like(x, dtype=numerics.STORAGE_DTYPE[dtype]),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


@torch.library.custom_op(f"{_LIB}::hadamard_transform", mutates_args=())
def hadamard_transform(x: torch.Tensor, h_block: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (h_block kron H_p) x`` along the last dim (``p = n / m`` a power of two), fp32 inside."""
    n, m = x.shape[-1], h_block.shape[0]
    if h_block.shape != (m, m) or m == 0 or n % m or (n // m) & (n // m - 1):
        raise ValueError(f"hadamard_transform: x's last dim {n} must be h_block's order {m} times a power of two "
                         f"(h_block {tuple(h_block.shape)})")
    return ref.hadamard_transform_ref(x, h_block, scale)


@hadamard_transform.register_fake
def _(x, h_block, scale):
    return torch.empty_like(x)


def _hadamard_setup(ctx, inputs, output):
    _, h_block, scale = inputs
    ctx.h_block, ctx.scale = h_block, scale


def _hadamard_backward(ctx, grad):
    # y = scale (h_block kron H_p) x, so dx = scale (h_block^T kron H_p) dy (Sylvester's H_p is symmetric)
    return hadamard_transform(grad.contiguous(), ctx.h_block.t().contiguous(), ctx.scale), None, None


# block tuning (SignRound) and QAT backpropagate through a model's online transforms
hadamard_transform.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)


@torch.library.custom_op(f"{_LIB}::kv_cache_read", mutates_args=())
def kv_cache_read(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: str, head_dim: int,
                  out_dtype: torch.dtype, group: int = 0, rotation: torch.Tensor | None = None,
                  center: torch.Tensor | None = None) -> torch.Tensor:
    """The keys or values a quantized KV cache stores as ``codes`` (layout in ``qcompiler.core.kv_format``;
    ``group`` > 0: per_group scales, one per block of ``group`` positions); with ``rotation`` / ``center``
    (a rotated / centered cache) the codes are of ``kv_format.to_stored(x)`` and the read is
    ``from_stored`` of them."""
    if rotation is None and center is None:
        return kv_format.read(codes, scale, zero, dtype, head_dim, out_dtype, group).contiguous()
    stored = kv_format.read(codes, scale, zero, dtype, head_dim, torch.float32, group)
    return kv_format.from_stored(stored, rotation, center, out_dtype).contiguous()


@kv_cache_read.register_fake
def _(codes, scale, zero, dtype, head_dim, out_dtype, group=0, rotation=None, center=None):
    return codes.new_empty((*codes.shape[:-1], head_dim), dtype=out_dtype)


#: ops with a Triton kernel, each declared again below as ``qcompiler::triton_<op>``
TRITON_KERNEL_OPS = ("int8_gemm", "fp8_gemm", "weight_only_gemm", "int4_gemm", "w4a8_gemm", "norm_quantize_per_token",
                     "hadamard_transform")


def _declare_triton_op(name: str) -> None:
    """``qcompiler::triton_<name>``: ``name``'s schema plus ``*, int report_id=0``; its fake runs ``name``'s."""
    generic = getattr(torch.ops.qcompiler, name).default
    schema = str(generic._schema)                    # "qcompiler::name(Tensor a_q, ...) -> Tensor"
    params, returns = schema[schema.index("("):].rsplit(") ->", 1)
    twin_schema = f"{params}, *, int report_id=0) ->{returns}"

    def no_kernel(*args, report_id: int = 0, **kwargs):
        raise NotImplementedError(f"qcompiler::triton_{name} has no kernel for these tensors' device: the Triton "
                                  "backend registers its CPU and CUDA kernels (qcompiler.backends.triton.lowering)")

    op = torch.library.custom_op(f"{_LIB}::triton_{name}", no_kernel, mutates_args=(), schema=twin_schema)

    @op.register_fake
    def _(*args, report_id: int = 0, **kwargs):
        return generic(*args, **kwargs)              # the fake tensors dispatch to the generic op's fake


for _name in TRITON_KERNEL_OPS:
    _declare_triton_op(_name)


def triton_op(name: str) -> torch._ops.OpOverload:
    """The OpOverload ``torch.ops.qcompiler.triton_<name>.default`` (``name`` in ``TRITON_KERNEL_OPS``)."""
    return getattr(torch.ops.qcompiler, f"triton_{name}").default


_ops = torch.ops.qcompiler
#: Fused GEMM op packets, as they appear as node targets.
GEMM_OPS = (_ops.int8_gemm, _ops.fp8_gemm, _ops.weight_only_gemm, _ops.int4_gemm, _ops.w4a8_gemm)
QDQ_OPS = (_ops.quantize, _ops.dequantize, _ops.quantize_per_token, _ops.dequantize_int4)


# ----------------------------------------------------------------------------- decode attention over a quantized KV cache


@torch.library.custom_op(f"{_LIB}::kv_decode_attention", mutates_args=())
def kv_decode_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor | None,
                        k_window: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor,
                        v_zero: torch.Tensor | None, v_window: torch.Tensor, attn_mask: torch.Tensor | None,
                        sm_scale: float, k_dtype: str, v_dtype: str, k_group: int = 0,
                        v_group: int = 0) -> torch.Tensor:
    """Scaled-dot-product attention of ``q`` over a quantized KV cache, the cache read and the attention as one op.

    - ``q`` [B, Hq, M, D] (float32 / bfloat16 / float16; M: the decode rows, 1..16 in practice);
    - keys ``K = cat([kv_cache_read(k_codes, k_scale, k_zero, k_dtype, D), k_window], dim=-2)``, values
      ``V`` likewise (``Dv = v_window.shape[-1]``): codes, scales and zero points in the layout of
      ``qcompiler.core.kv_format`` (``k_dtype`` / ``v_dtype``: int8 / uint8 / fp8_e4m3 / int4 / uint4),
      windows [B, Hkv, Tw, D] in full precision (Tw and the codes' length Tq may be 0); T = Tq + Tw;
      ``k_group`` / ``v_group`` > 0: that role's scales are per_group, [B, Hkv, NB, D] per block of that many positions;
    - grouped-query heads: Hq a multiple of Hkv, query head h reads KV head ``h // (Hq // Hkv)``;
    - ``attn_mask`` None, additive float or boolean (True = attend), broadcastable to [B, Hq, M, T].
      There is no causal flag: the caller's mask carries causality (a single decode row attends to every
      cached key; for M > 1 rows, or padded batches, pass the mask HF builds);
    - ``scores = (q @ K^T) * sm_scale + mask``, softmax over T, ``@ V``: all in float32 (codes dequantized
      straight to float32, not rounded to the model's dtype first), output [B, Hq, M, Dv] in q's dtype.
      A row whose keys are all masked gives 0 (as ``scaled_dot_product_attention``).

    Reference kernel: ``reference_kernels.kv_decode_attention_ref``; Triton kernel:
    ``qcompiler.backends.triton.decode_attention`` (twin op ``qcompiler::triton_kv_decode_attention``).
    """
    return ref.kv_decode_attention_ref(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window,
                                       attn_mask, sm_scale, k_dtype, v_dtype, k_group, v_group)


@kv_decode_attention.register_fake
def _(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window, attn_mask, sm_scale, k_dtype,
      v_dtype, k_group=0, v_group=0):
    return q.new_empty((*q.shape[:-1], v_window.shape[-1]))


__all__.append("kv_decode_attention")
# qcompiler::triton_kv_decode_attention: declared here, its kernel registered by
# qcompiler.backends.triton.decode_attention.register() (not yet in TRITON_KERNEL_OPS / lowering.KERNELS)
_declare_triton_op("kv_decode_attention")
