"""Model quality and speed: perplexity over eval windows, prefill throughput."""

from __future__ import annotations

import inspect
import logging
import math
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

__all__ = ["perplexity", "prefill_tokens_per_s", "paired_prefill", "PairedSpeed", "accepts_logits_to_keep"]


def _model_device(model: object) -> torch.device | None:
    """The model's device when it exposes one (HF models and torch.compile wrappers do)."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else None


def perplexity(
    model: Callable[..., object],
    windows: list[Tensor],
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Perplexity ``exp(sum NLL / n_predicted)`` of next-token predictions over ``windows``.

    Args:
        model: any callable ``model(input_ids=w)`` returning an object with ``.logits`` [1, T, V]
            (a Hugging Face model, or one wrapped by ``torch.compile``).
        windows: int64 tensors of shape [1, T], e.g. from ``eval_windows``; every position after the
            first is scored (a leading BOS is only ever context, never a target).
        progress: show a tqdm bar.
        desc: label for the bar.
    """
    if not windows:
        raise ValueError("perplexity: windows is empty")
    total_nll = 0.0
    total_predicted = 0
    device = _model_device(model)
    with torch.inference_mode():
        for w in tqdm(windows, desc=desc, disable=not progress, unit="win"):
            if w.ndim != 2 or w.shape[0] != 1 or w.shape[1] < 2:
                raise ValueError(f"perplexity: each window must have shape [1, T>=2], got {tuple(w.shape)}")
            logits = model(input_ids=w if device is None else w.to(device)).logits
            logp = F.log_softmax(logits[0, :-1].to(torch.float64), dim=-1)
            targets = w[0, 1:].to(logits.device)
            total_nll -= logp.gather(-1, targets.unsqueeze(-1)).sum().item()
            total_predicted += targets.numel()
    ppl = math.exp(total_nll / total_predicted)
    log.info("%s: %.4f over %d predicted tokens in %d windows", desc, ppl, total_predicted, len(windows))
    return ppl


def accepts_logits_to_keep(model: object) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (looked up through ``torch.compile``'s wrapper)."""
    inner = getattr(model, "_orig_mod", model)
    forward = getattr(inner, "forward", inner)
    try:
        return "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def _prefill_runner(model, seq_len: int, vocab_size: int, seed: int, last_logits_only: bool) -> Callable[[], float]:
    """A callable timing one prefill forward of ``model`` on a fixed random sequence (seconds)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (1, seq_len), generator=gen)
    device = _model_device(model)
    if device is not None:
        input_ids = input_ids.to(device)
    kwargs = {"logits_to_keep": 1} if last_logits_only and accepts_logits_to_keep(model) else {}
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)

    def once() -> float:
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            model(input_ids=input_ids, **kwargs)
            sync()
        return time.perf_counter() - t0
    once.last_logits = bool(kwargs)
    return once


def _check_prefill_args(**values: int) -> None:
    lows = {"seq_len": 1, "vocab_size": 1, "repeats": 1, "warmup": 0}
    for arg, value in values.items():
        if not isinstance(value, int) or value < lows[arg]:
            raise ValueError(f"prefill_tokens_per_s: {arg} must be an int >= {lows[arg]}, got {value!r}")


def prefill_tokens_per_s(
    model: Callable[..., object],
    seq_len: int = 512,
    *,
    vocab_size: int,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    last_logits_only: bool = True,
) -> float:
    """Prefill throughput: ``seq_len`` / median wall time of one forward on a random [1, seq_len] sequence.

    ``last_logits_only``: run the forward as ``generate()`` runs its prefill, scoring only the last
    position (``logits_to_keep=1``, where the model's forward takes it); False scores every position.
    """
    _check_prefill_args(seq_len=seq_len, vocab_size=vocab_size, repeats=repeats, warmup=warmup)
    once = _prefill_runner(model, seq_len, vocab_size, seed, last_logits_only)
    times = [once() for _ in range(warmup + repeats)][warmup:]
    median = statistics.median(times)
    log.info("prefill: %d tokens in %.4f s (median of %d; %s)", seq_len, median, repeats,
             "last position's logits" if once.last_logits else "every position's logits")
    return seq_len / median


class PairedSpeed(NamedTuple):
    """A paired prefill measurement: the model's tokens/s and its speedup over the baseline (the
    median of the per-round ratios), with the interquartile range of those ratios (the noise)."""

    tok_s: float
    speedup: float
    low: float
    high: float
    rounds: int


def paired_prefill(
    baseline: Callable[..., object],
    model: Callable[..., object],
    seq_len: int = 512,
    *,
    vocab_size: int,
    repeats: int = 9,
    warmup: int = 1,
    seed: int = 0,
    last_logits_only: bool = True,
    min_seconds: float = 2.0,
) -> PairedSpeed:
    """The model's prefill tokens/s and its speedup over ``baseline``, the two timed in alternation.

    Each round runs one baseline forward then one model forward on the same sequence, so a burst
    of load on a shared machine slows both alike; the speedup is the median of the rounds' ratios
    (baseline time / model time), reported with their interquartile range so that "within noise"
    can be read off the table rather than assumed.
    At least ``repeats`` rounds, more when a round is short: as many as fill ``min_seconds`` (judged
    from the warm-up round), so that a fast model's median rests on enough samples.
    """
    _check_prefill_args(seq_len=seq_len, vocab_size=vocab_size, repeats=repeats, warmup=warmup)
    runs = [_prefill_runner(m, seq_len, vocab_size, seed, last_logits_only) for m in (baseline, model)]
    round_s = 0.0
    for _ in range(warmup):
        round_s = runs[0]() + runs[1]()
    rounds = max(repeats, math.ceil(min_seconds / round_s)) if round_s > 0 else repeats
    base_t, model_t = [], []
    for _ in range(rounds):
        base_t.append(runs[0]())
        model_t.append(runs[1]())
    ratios = [b / m for b, m in zip(base_t, model_t)]
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    med = statistics.median(model_t)
    log.info("prefill paired: %d tokens, model %.4f s, baseline %.4f s (medians of %d rounds)", seq_len, med,
             statistics.median(base_t), rounds)
    return PairedSpeed(seq_len / med, statistics.median(ratios), low, high, rounds)
