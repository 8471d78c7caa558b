"""Rotation on SmolLM2, validation text only (second half of WikiText-2 valid, 8 windows of 1,024 tokens):
float and given presets without and with qcompiler.rotate. Source of the README's rotation figures.

    python benchmarks/rotation_validation.py w4a16-rtn
"""
import torch, sys
import qcompiler
from qcompiler.tools.models import load_model
from qcompiler.tools import texts, data
from qcompiler.tools.evaluate import perplexity
torch.set_num_threads(2)
model, tok = load_model("smollm2-135m")
ids = data.tokenize_text(tok, open(texts.text_path("wikitext-valid")).read())
half = ids.numel() // 2
wins = data.eval_windows(ids[half:], 8192, 1024)
fp = perplexity(model, wins, progress=False); print("fp32", fp, flush=True)
for rot in (False, True):
    m, _ = load_model("smollm2-135m")
    if rot:
        r = qcompiler.rotate(m, seed=0); print(r.summary(), flush=True)
        p = perplexity(m, wins, progress=False); print("rotated float", p, f"{100*(p/fp-1):+.3f}%", flush=True)
    for preset in sys.argv[1:]:
        q = __import__("copy").deepcopy(m)
        qcompiler.quantize(q, preset, progress=False)
        p = perplexity(q, wins, progress=False)
        print(("rot+" if rot else "") + preset, round(p, 4), f"{100*(p/fp-1):+.2f}%", flush=True)
