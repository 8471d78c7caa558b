r"""stories260K: where the FP8 KV cache's loss comes from — keys or values, before or after RoPE — beside INT8.

Static per-tensor scales (absmax over the calibration batches), fake-quantized by hand: "before RoPE" at the
outputs of the ``k_proj`` / ``v_proj`` modules (forward hooks), "after RoPE" at the key / value inputs of
``scaled_dot_product_attention`` (where the cache is written). Calibration 64 x 512 tokens from the first half
of the TinyStories calibration text, evaluation 40 windows of 512 from its second half (disjoint; the test
text is not read). Prints a markdown table.

    python benchmarks/kv_fp8_keys_stories260K.py
    python benchmarks/kv_fp8_keys_stories260K.py --mechanism    # the score-error decomposition (``mechanism``)
"""
import argparse

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from qcompiler.core import numerics
from qcompiler.tools import data, texts
from qcompiler.tools.evaluate import perplexity
from qcompiler.tools.models import load_model

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mechanism", action="store_true",
                    help="print the attention-score error decomposition instead of the perplexity table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("stories260K")
    ids = data.tokenize_text(tok, open(texts.text_path("tinystories-calib")).read())
    half = ids.numel() // 2
    calib = data.calibration_batches(ids[:half], 64, 512, seed=0, bos_id=tok.bos_token_id)
    wins = data.eval_windows(ids[half:], 20480, 512, bos_id=tok.bos_token_id)
    layers = model.config.num_hidden_layers
    projs = {n: m for n, m in model.named_modules() if n.endswith(("k_proj", "v_proj"))}
    amax: dict = {}

    class Attention(TorchFunctionMode):
        """Records (observe) or fake-quantizes (roles) the attention's key / value inputs."""

        def __init__(self, roles: str = "", dtype: str = "", observe: bool = False):
            super().__init__()
            self.roles, self.dtype, self.observe, self.i = roles, dtype, observe, 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in _SDPA:
                args, layer = list(args), self.i % layers
                self.i += 1
                for pos, role in ((1, "k"), (2, "v")):
                    if self.observe:
                        amax[(layer, role)] = max(amax.get((layer, role), 0.0), args[pos].abs().max().item())
                    elif role in self.roles:
                        args[pos] = fake_quantize(args[pos], amax[(layer, role)], self.dtype)
            return func(*args, **kwargs)

    def fake_quantize(x, absmax, dtype):
        scale = torch.tensor(absmax / numerics.QRANGE[dtype][1])
        return numerics.dequantize(numerics.quantize(x, scale, None, dtype), scale, None, x.dtype)

    def observe_hook(name):
        def hook(module, args, out):
            amax[name] = max(amax.get(name, 0.0), out.abs().max().item())
        return hook

    handles = [m.register_forward_hook(observe_hook(n)) for n, m in projs.items()]
    with torch.no_grad(), Attention(observe=True):
        for b in calib:
            model(b)
    for h in handles:
        h.remove()
    fp = perplexity(model, wins, progress=False)

    def run(dtype: str, roles: str, before_rope: bool) -> float:
        handles = []
        if before_rope:
            for name, m in projs.items():
                if name.endswith(tuple(f"{r}_proj" for r in roles)):
                    handles.append(m.register_forward_hook(
                        lambda mod, args, out, name=name: fake_quantize(out, amax[name], dtype)))
        with Attention("" if before_rope else roles, dtype):
            p = perplexity(model, wins, progress=False)
        for h in handles:
            h.remove()
        return 100 * (p / fp - 1)

    if args.mechanism:
        mechanism(model, wins[:4], layers, projs, amax, Attention, fake_quantize)
        return
    print(f"FP32 perplexity {fp:.4f} (stories260K, 40 x 512 tokens of the calibration text's second half)\n")
    print("| dtype | quantized | before RoPE (k_proj / v_proj) Δ% | after RoPE (cache) Δ% |")
    print("|---|---|---|---|")
    for dtype in ("fp8_e4m3", "int8"):
        for roles, what in (("kv", "keys and values"), ("k", "keys"), ("v", "values")):
            print(f"| {dtype} | {what} | {run(dtype, roles, True):+.2f} | {run(dtype, roles, False):+.2f} |", flush=True)


def mechanism(model, wins, layers, projs, amax, Attention, fake_quantize) -> None:
    """Why FP8 keys lose more after RoPE: per layer, the keys' error as the attention sees it.

    A perturbation ``d`` of one query's scores changes its attention distribution ``p`` by
    ``KL(p || p') ~ Var_p(d) / 2`` to first order: the part of ``d`` common to all keys (its mean under
    ``p``) cancels in the softmax. So the table gives, per layer, the keys' score error
    ``d = q . (k_quantized - k) / sqrt(head_dim)`` (at the attention's input, after RoPE, whichever side
    of RoPE the keys were quantized on): its mean square, and ``Var_p(d) / 2`` averaged over queries.
    Also the share of the pre-RoPE FP8 key error that is the same for every token (each channel's mean
    error over the tokens, squared, over the mean squared error): an error common to all keys cancels.
    """
    captured: dict = {}

    class Capture(TorchFunctionMode):
        """Records each attention's query and key inputs; with ``dtype``, fake-quantizes layer ``only``'s keys
        here (after RoPE) unless ``before_rope`` (then a hook on its ``k_proj`` did)."""

        def __init__(self, dtype="", before_rope=True, only=-1):
            super().__init__()
            self.dtype, self.before_rope, self.only, self.i = dtype, before_rope, only, 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in _SDPA:
                args, layer = list(args), self.i % layers
                self.i += 1
                if self.dtype and not self.before_rope and layer == self.only:
                    args[1] = fake_quantize(args[1], amax[(layer, "k")], self.dtype)
                captured[layer] = (args[0].detach(), args[1].detach())
            return func(*args, **kwargs)

    k_projs = [m for n, m in projs.items() if n.endswith("k_proj")]
    k_names = [n for n in projs if n.endswith("k_proj")]

    def keys_at(layer, dtype="", before_rope=True):
        """(q, k) at ``layer``'s attention for each window, only that layer's keys quantized (as asked)."""
        out = []
        for w in wins:
            handle = None
            if dtype and before_rope:
                handle = k_projs[layer].register_forward_hook(
                    lambda mod, a, o: fake_quantize(o, amax[k_names[layer]], dtype))
            with torch.no_grad(), Capture(dtype, before_rope, layer):
                model(w)
            if handle is not None:
                handle.remove()
            out.append(captured[layer])
        return out

    pre_err: dict = {}

    def pre_hook(name):
        def hook(mod, a, o):
            pre_err.setdefault(name, []).append((fake_quantize(o, amax[name], "fp8_e4m3") - o).flatten(0, -2))
        return hook

    handles = [m.register_forward_hook(pre_hook(n)) for n, m in zip(k_names, k_projs)]
    with torch.no_grad():
        for w in wins:
            model(w)
    for h in handles:
        h.remove()
    print("| dtype | keys quantized | layer | mean square score error | Var_p(score error) / 2 (first-order KL) |")
    print("|---|---|---|---|---|")
    for dtype in ("fp8_e4m3", "int8"):
        for before_rope in (True, False):
            for layer in range(layers):
                ms, kl, n = 0.0, 0.0, 0
                for (q, k), (_, kq) in zip(keys_at(layer), keys_at(layer, dtype, before_rope)):
                    groups = q.shape[1] // k.shape[1]
                    k, kq = k.repeat_interleave(groups, 1), kq.repeat_interleave(groups, 1)
                    scale = q.shape[-1] ** -0.5
                    s = (q @ k.transpose(-1, -2)) * scale
                    d = (q @ (kq - k).transpose(-1, -2)) * scale
                    causal = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
                    p = s.masked_fill(~causal, float("-inf")).softmax(-1)
                    d = d.masked_fill(~causal, 0.0)
                    mean = (p * d).sum(-1, keepdim=True)
                    kl += float((p * (d - mean) ** 2).sum(-1).mean() / 2)
                    ms += float((d ** 2).sum() / causal.sum() / d.shape[0] / d.shape[1])
                    n += 1
                print(f"| {dtype} | {'before' if before_rope else 'after'} RoPE | {layer} | {ms / n:.3e} | "
                      f"{kl / n:.3e} |", flush=True)
    print("\nShare of the pre-RoPE FP8 key error common to all tokens (per channel mean error squared / mean "
          "squared error), per layer:")
    for name, errs in pre_err.items():
        e = torch.cat(errs)
        print(f"- {name}: {float((e.mean(0) ** 2).sum() / (e ** 2).mean(0).sum()):.3f}")


if __name__ == "__main__":
    main()
