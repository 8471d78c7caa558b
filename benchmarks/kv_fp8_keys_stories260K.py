r"""stories260K: where the FP8 KV cache's loss comes from — keys or values, before or after RoPE — beside INT8.

Static per-tensor scales (absmax over the calibration batches), fake-quantized by hand: "before RoPE" at the
outputs of the ``k_proj`` / ``v_proj`` modules (forward hooks), "after RoPE" at the key / value inputs of
``scaled_dot_product_attention`` (where the cache is written). Calibration 64 x 512 tokens from the first half
of the TinyStories calibration text, evaluation 40 windows of 512 from its second half (disjoint; the test
text is not read). Prints a markdown table.

    python benchmarks/kv_fp8_keys_stories260K.py
"""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from qcompiler.core import numerics
from qcompiler.tools import data, texts
from qcompiler.tools.evaluate import perplexity
from qcompiler.tools.models import load_model

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def main() -> None:
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

    print(f"FP32 perplexity {fp:.4f} (stories260K, 40 x 512 tokens of the calibration text's second half)\n")
    print("| dtype | quantized | before RoPE (k_proj / v_proj) Δ% | after RoPE (cache) Δ% |")
    print("|---|---|---|---|")
    for dtype in ("fp8_e4m3", "int8"):
        for roles, what in (("kv", "keys and values"), ("k", "keys"), ("v", "values")):
            print(f"| {dtype} | {what} | {run(dtype, roles, True):+.2f} | {run(dtype, roles, False):+.2f} |", flush=True)


if __name__ == "__main__":
    main()
