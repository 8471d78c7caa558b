"""Quantize a Hugging Face causal LM with torch.compile, then the same eagerly, and save it.

Run: python examples/quickstart.py   (uses ../shared/models/stories260K when present, else a tiny random Llama)
"""

import copy
import tempfile

import torch

import qcompiler
from qcompiler.tools import models
from qcompiler.runtime.serialization import load_quantized, save_quantized

if models.shared_dir() is not None:
    model, tok = models.load_model("stories260K")
else:
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172,
                                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)).eval()
vocab = model.config.vocab_size
batches = [torch.randint(0, vocab, (1, 128)) for _ in range(8)]        # or real token ids
input_ids = torch.randint(0, vocab, (1, 64))

recipe = qcompiler.recipes.get("w8a8-int8-sq")                           # or qcompiler.Recipe.from_json(text)
qmodel = torch.compile(model, backend=qcompiler.backend(recipe, calibration=batches))
with torch.no_grad():
    logits = qmodel(input_ids).logits
print(qcompiler.report(qmodel))

eager = qcompiler.quantize(copy.deepcopy(model), recipe, calibration=batches)   # same numerics, no torch.compile
with torch.no_grad():
    print("eager vs compiled max |diff|:", (eager(input_ids).logits - logits).abs().max().item())

with tempfile.TemporaryDirectory() as d:
    save_quantized(eager, d, recipe)
    reloaded, _ = load_quantized(d)
    with torch.no_grad():
        print("reloaded equals eager:", torch.equal(reloaded(input_ids).logits, eager(input_ids).logits))
