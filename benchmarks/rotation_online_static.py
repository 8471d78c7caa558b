"""Why ``w8a8-int8-sq+rot-online`` loses 9% on SmolLM2: the model rotated once with online transforms, then
quantized with variants of the activation spec, on validation text only (``rotation_validation.py``'s protocol:
calibration from the first half of WikiText-2 valid, 8 windows of 1,024 tokens of its second half). Prints each
variant's perplexity, the linears kept in float, and the first 12 ``down_proj`` static scales and SQNRs.

    python benchmarks/rotation_online_static.py                       # all variants
    python benchmarks/rotation_online_static.py "dynamic per-token" minmax
"""
import copy, dataclasses, sys, time
import torch
import qcompiler
from qcompiler import recipes
from qcompiler.recipes import Calibrator
from qcompiler.tools import data, texts
from qcompiler.tools.evaluate import perplexity
from qcompiler.tools.models import load_model
torch.set_num_threads(2)
model, tok = load_model("smollm2-135m")
ids = data.tokenize_text(tok, open(texts.text_path("wikitext-valid")).read())
half = ids.numel() // 2
wins = data.eval_windows(ids[half:], 8192, 1024)
calib = data.calibration_batches(ids[:half], 128, 512, seed=0)
fp = perplexity(model, wins, progress=False)
print("fp32", fp, flush=True)
rot = copy.deepcopy(model)
print(qcompiler.rotate(rot, seed=0, online=True).summary(), flush=True)
def act(r, **kw):
    return r.replace(name=r.name + "~" + ",".join(f"{k}={v}" for k, v in kw.items()), activation=dataclasses.replace(r.activation, **kw))
base = recipes.get("w8a8-int8-sq+rot-online")
variants = {
    "default (mse)": base,
    "minmax": act(base, calibrator=Calibrator.MINMAX),
    "percentile": act(base, calibrator=Calibrator.PERCENTILE),
    "dynamic per-token": recipes.get("w8a8-int8-sq-dynamic+rot-online"),
}
only = sys.argv[1:] or list(variants)
for name in only:
    r = variants[name]
    q = copy.deepcopy(rot)
    t = time.time()
    qcompiler.quantize(q, r, calibration=calib, progress=False)
    rep = qcompiler.report(q)
    kept = [f for f, d in rep.layers.items() if not d.quantize and d.op_kind == "linear"]
    p = perplexity(q, wins, progress=False)
    print(f"{name}: {p:.4f} {100 * (p / fp - 1):+.2f}% kept {len(kept)} ({time.time() - t:.0f}s)", flush=True)
    downs = [(f, d.act_scale, getattr(d, "sqnr_db", None)) for f, d in rep.layers.items() if f.endswith("down_proj")]
    print("  down_proj act_scale:", [f"{s:.3g}" if s else "-" for _, s, _ in downs[:12]], flush=True)
    print("  down_proj sqnr dB:", [f"{q:.1f}" if q else "-" for _, _, q in downs[:12]], flush=True)
