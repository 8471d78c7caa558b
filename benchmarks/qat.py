r"""Quantization-aware training on CPU: how much of a post-training preset's perplexity increase a short QAT
run (``qcompiler.prepare_qat`` -> a plain training loop -> ``qcompiler.convert``) recovers.

Regenerate (2 CPU cores, ~30 min per row for SmolLM2):

    python benchmarks/qat.py --model smollm2-135m --preset w4a16-rtn --learn-scales --minutes 25 \
        --out benchmarks/results_qat_smollm2.md
    python benchmarks/qat.py --model smollm2-135m --preset w4a16-gptq --learn-scales --minutes 25 \
        --out benchmarks/results_qat_smollm2.md --append

Training text: the calibration text of the model's protocol (WikiText-2 validation for SmolLM2), random
windows of ``--seq`` tokens; perplexity on the protocol's test windows, which training never sees.
``--eval valid`` (for choosing the learning rates and steps; never the test windows) scores the first
``--windows`` x context tokens of the calibration text instead, and calibrates and trains on the rest of it,
as ``benchmarks/recipe_sweep.py --eval valid`` does:

    for lr in 5e-5 1e-4; do python benchmarks/qat.py --model smollm2-135m --preset w4a16-rtn \
        --learn-scales --steps 50 --minutes 40 --lr $lr --scale-lr 1e-5 --eval valid --windows 16 \
        --out benchmarks/results_qat_sweep_smollm2.md --append; done The loss
is the KL divergence to the float model's logits (``qcompiler.distillation_loss``); AdamW on the latent
weights (``--lr``) and, with ``--learn-scales``, the weight scales (``--scale-lr``); everything else frozen.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import qcompiler
from qcompiler.backends import machine
from qcompiler.qat import FakeQuantLinear
from qcompiler.tools import data, evaluate, models
from qcompiler.tools.bench import PROTOCOLS, _text


def _train(student, teacher, batches, args) -> tuple[int, float, list[float]]:
    """The loop a user writes: steps until ``args.steps`` or ``args.minutes``; returns (steps, seconds, losses)."""
    for p in student.parameters():
        p.requires_grad_(False)
    weights, scales = [], []
    for m in student.modules():
        if isinstance(m, FakeQuantLinear):
            weights.append(m.weight)
            if isinstance(m.w_scale, torch.nn.Parameter):
                scales.append(m.w_scale)
    for p in weights + scales:
        p.requires_grad_(True)
    groups = [{"params": weights, "lr": args.lr}] + ([{"params": scales, "lr": args.scale_lr}] if scales else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    student.train()
    losses, t0, step = [], time.perf_counter(), 0
    bar = tqdm(total=args.steps, desc="QAT", disable=not sys.stderr.isatty())
    while step < args.steps and time.perf_counter() - t0 < 60 * args.minutes:
        ids = batches[step % len(batches)]
        with torch.no_grad():
            target = teacher(ids).logits
        loss = qcompiler.distillation_loss(student(ids).logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        bar.update(1)
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
    bar.close()
    student.eval()
    return step, time.perf_counter() - t0, losses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(PROTOCOLS))
    ap.add_argument("--preset", default="w4a16-rtn")
    ap.add_argument("--init", default="auto", choices=("auto", "float", "ptq"))
    ap.add_argument("--learn-scales", action="store_true", help="train the weight scales too (LSQ)")
    ap.add_argument("--steps", type=int, default=100000, help="at most this many steps")
    ap.add_argument("--minutes", type=float, default=25.0, help="stop training after this many minutes")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate of the latent weights")
    ap.add_argument("--scale-lr", type=float, default=1e-4, help="AdamW learning rate of the scales")
    ap.add_argument("--eval", choices=("test", "valid"), default="test",
                    help="score the protocol's test windows (default) or held-out calibration text (for sweeps)")
    ap.add_argument("--windows", type=int, default=16, help="with --eval valid: windows scored")
    ap.add_argument("--out", type=Path, help="write (or with --append, extend) the markdown table")
    ap.add_argument("--append", action="store_true", help="add the row to an existing --out table")
    args = ap.parse_args(argv)
    cmd = "python benchmarks/qat.py " + " ".join(sys.argv[1:] if argv is None else argv)
    protocol = PROTOCOLS[args.model]
    teacher, tok = models.load_model(args.model)
    bos = tok.bos_token_id if protocol.bos else None
    train_ids = data.tokenize_text(tok, _text(protocol.calib_text))
    if args.eval == "valid":     # the scored windows first, calibration and training on the rest: no overlap
        scored = args.windows * protocol.context
        if train_ids.numel() < 2 * scored:
            ap.error(f"--windows {args.windows} leaves too little of {protocol.calib_text} to train on")
        windows = data.eval_windows(train_ids[:scored], scored, protocol.context, bos_id=bos)
        train_ids = train_ids[scored:]
        eval_desc = f"the first {scored} tokens of {protocol.calib_text} (held out from calibration and training)"
    else:
        windows = data.eval_windows(data.tokenize_text(tok, _text(protocol.eval_text)), protocol.eval_tokens,
                                    protocol.context, bos_id=bos)
        eval_desc = f"{protocol.eval_text} (first {protocol.eval_tokens} tokens)"
    calib = data.calibration_batches(train_ids, protocol.calib_samples, protocol.calib_seq, seed=0, bos_id=bos)
    rows = data.calibration_batches(train_ids, 4096, args.seq, seed=1, bos_id=bos)
    batches = [torch.cat(rows[i:i + args.batch]) for i in range(0, len(rows) - args.batch + 1, args.batch)]
    progress = sys.stderr.isatty()
    fp = evaluate.perplexity(teacher, windows, progress=progress, desc="FP32")
    for p in teacher.parameters():
        p.requires_grad_(False)

    student = copy.deepcopy(teacher).requires_grad_(True)
    t0 = time.perf_counter()
    qcompiler.prepare_qat(student, args.preset, calib, init=args.init, learn_scales=args.learn_scales,
                          progress=progress)
    prepare_s = time.perf_counter() - t0
    # the post-training baseline: convert after zero steps is qcompiler.quantize's model bit for bit
    # (tests/test_qat.py), so the plan (GPTQ's calibration) runs once
    ptq_model = qcompiler.convert(copy.deepcopy(student))
    ptq = evaluate.perplexity(ptq_model, windows, progress=progress, desc=args.preset)
    del ptq_model
    steps, train_s, losses = _train(student, teacher, batches, args)
    qcompiler.convert(student)
    qat = evaluate.perplexity(student, windows, progress=progress, desc="QAT")
    recovered = (ptq - qat) / (ptq - fp) if ptq != fp else float("nan")
    tokens = steps * args.batch * args.seq
    first, last = (sum(losses[:10]) / max(len(losses[:10]), 1), sum(losses[-10:]) / max(len(losses[-10:]), 1))
    row = (f"| {args.preset} | {args.init} | {'yes' if args.learn_scales else 'no'} | {args.lr:g} / "
           f"{args.scale_lr if args.learn_scales else '-'} | {steps} | {tokens} | {train_s / 60:.1f} | "
           f"{first:.4f} -> {last:.4f} | {fp:.3f} | {ptq:.3f} ({100 * (ptq / fp - 1):+.2f}%) | "
           f"{qat:.3f} ({100 * (qat / fp - 1):+.2f}%) | {100 * recovered:.1f}% |")
    header = (f"# {args.model}: quantization-aware training (CPU)\n\n"
              f"Perplexity on {eval_desc} (context {protocol.context}, {len(windows)} windows); PTQ calibration "
              f"{protocol.calib_samples} x {protocol.calib_seq} tokens and QAT training windows of {args.seq} "
              f"tokens, both from {protocol.calib_text}{' (the rest of it)' if args.eval == 'valid' else ''} "
              f"(never the scored windows). "
              f"Loss: KL to the float model's logits; AdamW on the latent weights (and scales with LSQ); batch "
              f"{args.batch} x {args.seq}. Recovered: (PTQ - QAT) / (PTQ - FP32) perplexity. CPU: "
              f"{machine.describe()}, {torch.get_num_threads()} threads.\n\n"
              "| preset | init | learned scales | lr weights / scales | steps | tokens | train min | KL first 10 -> "
              "last 10 steps | FP32 | PTQ | QAT | recovered |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    line = f"{row}\n"
    cmd_line = f"- `{cmd}` ({datetime.date.today()}; prepare {prepare_s:.0f} s)\n"
    print(header + line + "\n" + cmd_line)
    if args.out:
        if args.append and args.out.exists():
            text = args.out.read_text()
            table, _, cmds = text.partition("\nCommands:\n")
            args.out.write_text(table.rstrip("\n") + "\n" + line + "\nCommands:\n" + cmds + cmd_line)
        else:
            args.out.write_text(header + line + "\nCommands:\n" + cmd_line)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
