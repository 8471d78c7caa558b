r"""How much of a qcompiler-vs-transformers perplexity gap is the preset's own float-rounding noise.

With dynamic activation quantization (per-token FP8 / INT8) a model is chaotic in float rounding: two
runtimes whose linears agree within 1e-6 for the same input (different GEMM summation orders) flip a few
activation codes, the flips grow through the layers, and perplexity moves. This script measures that
spread on each side: for a preset it quantizes the model (``kernels="exact"``), writes the
compressed-tensors checkpoint, loads it in transformers, and evaluates both models on the full protocol
unperturbed and with the embedding output multiplied by ``1 + eps * N(0, 1)`` (eps = 1e-6, seeded, the
same noise on both sides); the table gives each side's perplexities, mean, standard deviation and range,
and the gap between the means against that spread.

    python benchmarks/ct_agreement_spread.py --model smollm2-135m --preset fp8-dynamic --seeds 4 \
        --out benchmarks/results_ct_agreement_spread_smollm2.md
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import qcompiler
from qcompiler.backends import machine
from qcompiler.tools import data, evaluate, models
from qcompiler.tools.bench import PROTOCOLS, _text

sys.path.insert(0, str(Path(__file__).parent))
from compressed_tensors_agreement import _recipe  # noqa: E402  (preset names with weight overrides)


class _Perturb:
    """A forward hook multiplying a module's output by ``1 + eps * N(0, 1)`` from ``seed`` (None: off)."""

    def __init__(self, eps: float):
        self.eps, self.seed = eps, None

    def __call__(self, module, args, out):
        if self.seed is None:
            return out
        g = torch.Generator().manual_seed(self.seed)
        return out * (1 + self.eps * torch.randn(out.shape, generator=g).to(out.dtype))


def _per_linear(ours: torch.nn.Module, theirs: torch.nn.Module, ids: torch.Tensor) -> tuple[float, str]:
    """The largest relative L2 difference (float64) of a linear's output when transformers' module gets the
    input qcompiler's module got, and which linear."""
    ins, outs, got, hooks = {}, {}, {}, []
    mods = dict(theirs.named_modules())
    for fqn, m in ours.named_modules():
        if fqn in mods and hasattr(m, "in_features"):
            hooks.append(m.register_forward_hook(
                lambda mod, a, o, f=fqn: (ins.__setitem__(f, a[0].detach()), outs.__setitem__(f, o.detach()), None)[-1]))
    with torch.inference_mode():
        ours(input_ids=ids)
    for h in hooks:
        h.remove()
    hooks = [mods[f].register_forward_pre_hook(lambda mod, a, f=f: (ins[f],)) for f in ins]
    hooks += [mods[f].register_forward_hook(lambda mod, a, o, f=f: (got.__setitem__(f, o.detach()), None)[-1])
              for f in ins]
    with torch.inference_mode():
        theirs(input_ids=ids)
    for h in hooks:
        h.remove()
    errs = [(float((got[f].double() - outs[f].double()).norm() / outs[f].double().norm().clamp(min=1e-30)), f)
            for f in ins]
    return max(errs)


def _stats(xs: list[float]) -> str:
    return (f"{statistics.mean(xs):.4f} | {statistics.stdev(xs):.4f} ({100 * statistics.stdev(xs) / statistics.mean(xs):.3f}%) "
            f"| {min(xs):.4f} – {max(xs):.4f} ({100 * (max(xs) / min(xs) - 1):.3f}%)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(PROTOCOLS))
    ap.add_argument("--preset", default="fp8-dynamic")
    ap.add_argument("--seeds", type=int, default=4, help="perturbed evaluations per side (besides the unperturbed one)")
    ap.add_argument("--eps", type=float, default=1e-6)
    ap.add_argument("--no-calibration", action="store_true",
                    help="quantize without calibration data (fp8-dynamic: round to nearest instead of GPTQ)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    cmd = "python benchmarks/ct_agreement_spread.py " + " ".join(sys.argv[1:] if argv is None else argv)
    from transformers import AutoModelForCausalLM
    protocol = PROTOCOLS[args.model]
    model, tok = models.load_model(args.model)
    bos = tok.bos_token_id if protocol.bos else None
    windows = data.eval_windows(data.tokenize_text(tok, _text(protocol.eval_text)), protocol.eval_tokens,
                                protocol.context, bos_id=bos)
    recipe = _recipe(args.preset)
    calib = (data.calibration_batches(data.tokenize_text(tok, _text(protocol.calib_text)), protocol.calib_samples,
                                      protocol.calib_seq, seed=0, bos_id=bos)
             if recipe.needs_calibration and not args.no_calibration else None)
    qcompiler.quantize(model, recipe, calibration=calib, progress=False, kernels="exact")
    perturb = _Perturb(args.eps)
    seeds = [None] + list(range(1, args.seeds + 1))
    ppl: dict[str, dict] = {"qcompiler": {}, "transformers": {}}
    with tempfile.TemporaryDirectory(prefix="ct-spread-") as work:
        folder = qcompiler.save_compressed_tensors(model, Path(work) / "ckpt", recipe, tokenizer=tok)
        theirs = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        sides = {"qcompiler": model, "transformers": theirs}
        worst = _per_linear(model, theirs, windows[0].reshape(1, -1)[:, :256])
        print(f"per linear, same input: largest relative difference {worst[0]:.1e} ({worst[1]})", flush=True)
        for m in sides.values():
            m.get_input_embeddings().register_forward_hook(perturb)
        for seed in seeds:
            perturb.seed = seed
            for side, m in sides.items():
                t0 = time.perf_counter()
                ppl[side][seed] = evaluate.perplexity(m, windows, progress=False)
                print(f"{side} seed {seed}: {ppl[side][seed]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    head = " | ".join("unperturbed" if s is None else f"seed {s}" for s in seeds)
    rows = [f"| {side} | " + " | ".join(f"{v[s]:.4f}" for s in seeds) + f" | {_stats(list(v.values()))} |"
            for side, v in ppl.items()]
    means = {side: statistics.mean(v.values()) for side, v in ppl.items()}
    gap = 100 * (means["transformers"] / means["qcompiler"] - 1)
    unperturbed = 100 * (ppl["transformers"][None] / ppl["qcompiler"][None] - 1)
    text = (f"# {args.model}: `{args.preset}` perplexity, qcompiler vs transformers, under {args.eps:g} perturbations\n\n"
            f"Generated {datetime.date.today()} by `{cmd}`.\n\n"
            f"Perplexity on the first {protocol.eval_tokens or 'all'} tokens of {protocol.eval_text} (context "
            f"{protocol.context}, {len(windows)} windows, float32). `qcompiler`: the model `qcompiler.quantize` returns "
            f"(eager, `kernels=exact`); `transformers`: `from_pretrained` on its compressed-tensors checkpoint. "
            f"`seed s`: the embedding output times `1 + {args.eps:g} N(0, 1)` (seeded, the same on both sides). "
            f"torch {torch.__version__}, CPU: {machine.describe()}.\n\n"
            f"| model | {head} | mean | std | range |\n|---|{'---|' * (len(seeds) + 3)}\n" + "\n".join(rows) +
            f"\n\ntransformers vs qcompiler: unperturbed {unperturbed:+.3f}%, means {gap:+.3f}%. Each linear fed "
            f"qcompiler's input (first window, 256 tokens): largest relative output difference {worst[0]:.1e} "
            f"({worst[1]}).\n")
    print(text)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
