r"""How much an fp8 row's output depends on the float32 summation order of its GEMM.

The same round-to-nearest ``fp8-dynamic`` SmolLM2 (no calibration) runs with its fp8 GEMMs on
dequantize + MKL's float32 GEMM (``fp8-dequant``) and on dequantize + oneDNN's (``fp8-dequant-onednn``):
both keep the fp32 contract, only the order of the sums differs. Prints the perplexity of each on the
first 4 windows of WikiText-2 test and the relative difference of their logits on the first window.
~2 min on 2 cores; needs ``../shared`` (or ``QCOMPILER_SHARED``) for the text:

    python benchmarks/fp8_summation.py
"""

from __future__ import annotations

import warnings

import torch

import qcompiler
from qcompiler.tools import data, evaluate, models
from qcompiler.tools.bench import PROTOCOLS, _text


def main() -> None:
    warnings.filterwarnings("ignore")
    protocol = PROTOCOLS["smollm2-135m"]
    model, tok = models.load_model("smollm2-135m")
    windows = data.eval_windows(data.tokenize_text(tok, _text(protocol.eval_text)), 4 * protocol.context,
                                protocol.context)
    logits = {}
    print("| fp8_gemm kernel | perplexity (4 windows) |\n|---|---|")
    for kernel in ("fp8-dequant", "fp8-dequant-onednn"):
        torch._dynamo.reset()
        backend = qcompiler.backend("fp8-dynamic", progress=False, kernels={"fp8_gemm": kernel})
        compiled = torch.compile(model, backend=backend)
        ppl = evaluate.perplexity(compiled, windows, progress=False)
        with torch.no_grad():
            logits[kernel] = compiled(windows[0]).logits.double()
        print(f"| {kernel} | {ppl:.3f} |")
    a, b = logits.values()
    print(f"\nlogits of window 1, relative difference (norm): {float((a - b).norm() / a.norm()):.3f}")


if __name__ == "__main__":
    main()
