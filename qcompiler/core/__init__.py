"""Numeric primitives and op schemas: quantize / dequantize math (``numerics``), INT4 packing, quantized
weights (``layer_quant``), every ``qcompiler::`` op with its fake (``ops``) and reference kernel, and the
GEMM format table (``formats``). Imports nothing else of qcompiler but ``errors`` and ``recipes``."""
