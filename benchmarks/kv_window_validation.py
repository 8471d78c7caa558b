r"""How the KV presets' residual windows were chosen: SmolLM2 perplexity on WikiText-2 *validation* text
only (calibration 64 x 512 tokens from the first half of valid.txt, 8 windows of 1,024 tokens from the
second half: disjoint), for KV specs given as ``dtype:key:value:sym|asym:window[:group_size][+rot][+center]``
(``+rot`` / ``+center``: ``KVCacheSpec.rotate`` / ``center``).

    python benchmarks/kv_window_validation.py fp8_e4m3:per_tensor:per_tensor:sym:0 \
        fp8_e4m3:per_tensor:per_tensor:sym:128 int4:per_channel:per_token:asym:0 \
        int4:per_channel:per_token:asym:128

``--ctx 4096`` evaluates 4 windows of 4,096 tokens instead (long-context drift):

    python benchmarks/kv_window_validation.py --ctx 4096 int4:per_channel:per_token:asym:128 \
        int4:per_group:per_token:asym:128:128 int4:per_group:per_token:asym:128:64 \
        int4:per_group:per_token:asym:128:32

Run 2026-12-02 (AMD EPYC, 2 threads; not committed as a table): FP32 24.572; fp8 window 0 +0.45%,
window 128 +0.13%; int4 window 0 +5.24%, window 128 +0.85% (fp8 per token, window 0: +0.51%).

Rotated / centered caches (the kv-*-rot presets), 2026-12-04 (Intel Xeon AMX, 2 threads):

    python benchmarks/kv_window_validation.py fp8_e4m3:per_tensor:per_tensor:sym:0 \
        fp8_e4m3:per_tensor:per_tensor:sym:0+rot fp8_e4m3:per_tensor:per_tensor:sym:0+rot+center \
        fp8_e4m3:per_head:per_head:sym:0+rot+center fp8_e4m3:per_token:per_token:sym:0+rot+center \
        int8:per_head:per_head:sym:0 int8:per_head:per_head:sym:0+rot int8:per_head:per_head:sym:0+center \
        int8:per_head:per_head:sym:0+rot+center int4:per_token:per_token:sym:0+rot+center

gave FP32 24.572; fp8 per tensor +0.35%, +rot +0.33%, +rot+center +0.55%; fp8 per head +rot+center +0.58%,
per token +rot+center +0.38%; int8 per head +0.51%, +rot +0.22%, +center +0.18%, +rot+center +0.06%
(kv-int8-rot); int4 per token +rot+center, no window, +5.24%.
"""
import argparse

import torch

import qcompiler
from qcompiler import recipes
from qcompiler.recipes import KVCacheSpec
from qcompiler.tools.models import load_model
from qcompiler.tools import texts, data
from qcompiler.tools.evaluate import perplexity
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("specs", nargs="+", help="dtype:key:value:sym|asym:window[:group_size][+rot][+center]")
parser.add_argument("--ctx", type=int, default=1024, help="evaluation window length (8,192 tokens at 1,024; else 4 windows)")
args = parser.parse_args()
torch.set_num_threads(2)
model, tok = load_model("smollm2-135m")
ids = data.tokenize_text(tok, open(texts.text_path("wikitext-valid")).read())
half = ids.numel() // 2
calib = data.calibration_batches(ids[:half], 64, 512, seed=0)
wins = data.eval_windows(ids[half:], 8192 if args.ctx == 1024 else 4 * args.ctx, args.ctx)
fp = perplexity(model, wins, progress=False)
print("fp32", fp, flush=True)
def spec(s):
    s, *flags = s.split("+")
    unknown = set(flags) - {"rot", "center"}
    if unknown:
        parser.error(f"unknown spec flags {sorted(unknown)} (expected +rot, +center)")
    d, k, v, sym, w, *g = s.split(":")
    return KVCacheSpec(d, k, v, sym == "sym", int(w), int(g[0]) if g else 0, rotate="rot" in flags,
                       center="center" in flags)
for item in args.specs:
    r = recipes.get("kv-int8").replace(name=item, kv_cache=spec(item))
    torch._dynamo.reset()
    c = torch.compile(model, backend=qcompiler.backend(r, calibration=calib, progress=False))
    with torch.inference_mode():
        p = perplexity(c, wins, progress=False)
    print(item, round(p, 4), f"{100*(p/fp-1):+.2f}%", flush=True)
