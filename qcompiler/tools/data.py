"""Token streams for calibration and evaluation: tokenize a text, sample calibration sequences, cut eval windows."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["calibration_batches", "eval_windows", "tokenize_text"]


def tokenize_text(tokenizer, text: str) -> Tensor:
    """Tokenize ``text`` in one call, without special tokens; returns a 1-D int64 tensor."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def _check_stream(token_ids: Tensor, fn: str) -> None:
    if not isinstance(token_ids, Tensor) or token_ids.ndim != 1:
        shape = tuple(token_ids.shape) if isinstance(token_ids, Tensor) else type(token_ids).__name__
        raise ValueError(f"{fn}: token_ids must be a 1-D tensor, got {shape}")


def _check_positive(fn: str, **kwargs: int | None) -> None:
    for arg, value in kwargs.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{fn}: {arg} must be a positive int, got {value!r}")


def calibration_batches(
    token_ids: Tensor,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    bos_id: int | None = None,
) -> list[Tensor]:
    """Sample ``n_samples`` sequences of shape [1, seq_len] at seeded random offsets of the stream.

    With ``bos_id`` each sequence is ``[bos] + seq_len - 1`` stream tokens.
    """
    _check_stream(token_ids, "calibration_batches")
    _check_positive("calibration_batches", n_samples=n_samples, seq_len=seq_len)
    if bos_id is not None and seq_len < 2:
        raise ValueError(f"calibration_batches: seq_len must be >= 2 with bos_id, got {seq_len}")
    if token_ids.numel() < seq_len:
        raise ValueError(
            f"calibration_batches: token stream has {token_ids.numel()} tokens, shorter than seq_len={seq_len}"
        )
    body = seq_len - 1 if bos_id is not None else seq_len
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - body + 1, (n_samples,), generator=gen)
    token_ids = token_ids.to(torch.int64)
    bos = torch.tensor([bos_id], dtype=torch.int64) if bos_id is not None else None
    batches = []
    for start in starts.tolist():
        seq = token_ids[start : start + body]
        if bos is not None:
            seq = torch.cat([bos, seq])
        batches.append(seq.unsqueeze(0))
    return batches


def eval_windows(
    token_ids: Tensor,
    n_tokens: int | None,
    ctx: int,
    bos_id: int | None = None,
) -> list[Tensor]:
    """Cut the first ``n_tokens`` of the stream (all if None) into non-overlapping [1, ctx] windows.

    With ``bos_id`` each window is ``[bos] + ctx - 1`` stream tokens. A last partial window is dropped.
    """
    _check_stream(token_ids, "eval_windows")
    _check_positive("eval_windows", n_tokens=n_tokens, ctx=ctx)
    if bos_id is not None and ctx < 2:
        raise ValueError(f"eval_windows: ctx must be >= 2 with bos_id, got {ctx}")
    stream = token_ids[:n_tokens].to(torch.int64)
    body = ctx - 1 if bos_id is not None else ctx
    n_windows = stream.numel() // body
    if n_windows == 0:
        log.warning("eval_windows: %d tokens make no full window of %d", stream.numel(), body)
    windows = stream[: n_windows * body].view(n_windows, body)
    if bos_id is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos_id, dtype=torch.int64), windows], dim=1)
    return [w.unsqueeze(0).clone() for w in windows]
