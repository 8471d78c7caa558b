"""Quantization-aware training with your own loop: prepare, train against the float model, convert, save.

Run: python examples/qat.py   (uses ../shared/models/stories260K when present, else a tiny random Llama)
"""

import copy
import tempfile

import torch

import qcompiler
from qcompiler.qat import FakeQuantLinear
from qcompiler.runtime.serialization import load_quantized, save_quantized
from qcompiler.tools import models


def main(steps: int = 20) -> float:
    if models.shared_dir() is not None:
        teacher, _ = models.load_model("stories260K")
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172,
                                               num_hidden_layers=2, num_attention_heads=8,
                                               num_key_value_heads=4)).eval()
    vocab = teacher.config.vocab_size
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, vocab, (1, 128), generator=g) for _ in range(8)]     # or real token ids
    train = [torch.randint(0, vocab, (4, 64), generator=g) for _ in range(steps)]
    teacher.requires_grad_(False)

    student = copy.deepcopy(teacher).requires_grad_(True)
    qcompiler.prepare_qat(student, "w4a16-rtn", calibration, learn_scales=True, progress=False)
    latent = [m.weight for m in student.modules() if isinstance(m, FakeQuantLinear)]
    scales = [m.w_scale for m in student.modules() if isinstance(m, FakeQuantLinear)]
    student.requires_grad_(False)                    # train the latent weights and scales only
    for p in latent + scales:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": latent, "lr": 5e-5}, {"params": scales, "lr": 1e-5}], weight_decay=0.0)
    for ids in train:
        with torch.no_grad():
            target = teacher(ids).logits
        loss = qcompiler.distillation_loss(student(ids).logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"KL to the float model after {steps} steps: {loss.item():.4f}")

    qcompiler.convert(student)                       # QuantizedLinear modules, as qcompiler.quantize makes
    with tempfile.TemporaryDirectory() as folder:
        save_quantized(student, folder, qcompiler.recipes.get("w4a16-rtn"))
        loaded, _ = load_quantized(folder)
    with torch.no_grad():
        same = torch.equal(loaded(train[0]).logits, student(train[0]).logits)
    print("saved and reloaded:", "same logits" if same else "DIFFERENT logits")
    return loss.item()


if __name__ == "__main__":
    main()
