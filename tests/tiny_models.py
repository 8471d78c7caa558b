"""Random-initialised tiny configs of the architectures qcompiler must handle without per-model code."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128

_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2),
    "gemma": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16),
    "phi3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "opt": dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2),
}
ARCHS = tuple(_CONFIGS)


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``arch`` in eval mode, float32, deterministic for ``seed``."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, vocab_size=VOCAB, **_CONFIGS[arch])
    model = AutoModelForCausalLM.from_config(cfg).eval()
    # Random init gives near-uniform activations; widen a few channels so outliers exist.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in type(model.get_submodule(name.rpartition(".")[0])).__name__.lower() \
                    or (p.dim() == 1 and name.endswith("weight") and "ln" in name):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def token_batches(n: int, seq: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, seq), generator=g) for _ in range(n)]


def calibration_batches(seed: int = 1) -> list[torch.Tensor]:
    """4 x 32 tokens: the 128 rows GPTQ needs at least (the fp8 presets run it)."""
    return token_batches(4, 32, seed)


def linear_inputs(model, batches, fqns) -> dict[str, torch.Tensor]:
    """The inputs of the named linears over ``batches`` (float64 rows), by forward pre-hooks."""
    rows: dict[str, list] = {f: [] for f in fqns}
    mods = dict(model.named_modules())
    hooks = [mods[f].register_forward_pre_hook(lambda m, a, f=f: rows[f].append(a[0].reshape(-1, a[0].shape[-1])))
             for f in fqns]
    try:
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b)
    finally:
        for h in hooks:
            h.remove()
    return {f: torch.cat(r).double() for f, r in rows.items()}
