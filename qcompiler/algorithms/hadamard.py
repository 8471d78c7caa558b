"""Hadamard matrices and the randomized orthogonal rotations built from them (QuaRot / SpinQuant).

``hadamard(n)``: an n x n matrix of +-1 with ``H @ H.T == n * I``, built as a Kronecker product of
Sylvester blocks (powers of two) and Paley-I blocks (``q + 1`` for a prime ``q = 3 mod 4``: 4, 8, 12,
20, 24, 32, 44, 48, ...), e.g. 576 = 12 x 12 x 4 (SmolLM2's hidden size). ``random_hadamard(n, seed)``
is ``H @ diag(+-1) / sqrt(n)``: orthogonal, and it spreads one outlier channel evenly over all.
``online_hadamard(n)``: the rotation ``qcompiler::hadamard_transform`` applies at run time,
``(H_m kron H_p) / sqrt(n)`` with ``p`` the largest power of two that leaves an ``m`` with a Hadamard
matrix (``online_factors``), so the transform is ``m`` fast Walsh-Hadamard transforms and an ``m x m`` mix.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["hadamard", "random_hadamard", "has_hadamard", "online_factors", "online_hadamard"]


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley(m: int) -> torch.Tensor | None:
    """Paley construction I of order ``m = q + 1``, ``q`` a prime with ``q = 3 mod 4``; None otherwise."""
    q = m - 1
    if q < 3 or q % 4 != 3 or not _is_prime(q):
        return None
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]          # Q[i, j] = chi(j - i), skew-symmetric
    h = torch.empty(m, m, dtype=torch.float64)
    h[0, :] = 1
    h[1:, 0] = -1
    h[1:, 1:] = jacobsthal + torch.eye(q, dtype=torch.float64)
    return h


@functools.lru_cache(maxsize=32)
def _hadamard(n: int) -> torch.Tensor | None:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n % 2 and n != 1:
        return None
    if n & (n - 1) == 0:          # Sylvester: [[H, H], [H, -H]]
        h = _hadamard(n // 2)
        return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    for m in range(4, n + 1, 4):  # a Paley block times a smaller Hadamard matrix
        if n % m == 0:
            p = _paley(m)
            rest = _hadamard(n // m) if p is not None else None
            if rest is not None:
                return torch.kron(p, rest)
    return None


def has_hadamard(n: int) -> bool:
    """Whether ``hadamard(n)`` can build a matrix of order ``n``."""
    return _hadamard(n) is not None


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (float64, entries +-1); ``ValueError`` when no construction
    here reaches ``n`` (orders that are not 1, 2 or a multiple of 4, or need a block beyond Paley I)."""
    h = _hadamard(n)
    if h is None:
        raise ValueError(f"no Hadamard matrix of order {n} from Sylvester and Paley-I blocks "
                         "(needs 1, 2 or a multiple of 4 that factors into 2^k and (prime = 3 mod 4) + 1 blocks)")
    return h.clone()


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """``hadamard(n) @ diag(s) / sqrt(n)``, ``s`` random signs from ``seed``: orthogonal (float64)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return hadamard(n) * signs[None, :] / math.sqrt(n)


def online_factors(n: int) -> tuple[int, int] | None:
    """``(m, p)`` with ``n = m * p``, ``p`` the largest power of two for which ``hadamard(m)`` exists; None
    when there is none (e.g. 1536 -> (12, 128), 576 -> (72, 8), 4096 -> (1, 4096))."""
    p = n & -n if n > 0 else 0
    while p >= 1:
        if _hadamard(n // p) is not None:
            return n // p, p
        p //= 2
    return None


def online_hadamard(n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(h_block, dense, scale)`` of the online transform of order ``n``: ``h_block`` [m, m] (+-1, float32)
    and ``scale = 1 / sqrt(n)``, the arguments of ``qcompiler::hadamard_transform``, and the orthogonal matrix
    it applies, ``dense = (h_block kron H_p) * scale`` (float64, ``y = dense @ x``); ``ValueError`` when ``n``
    has no such factorization."""
    f = online_factors(n)
    if f is None:
        raise ValueError(f"no online Hadamard transform of order {n}: no power-of-two factor p leaves n / p with a "
                         "Hadamard matrix from Sylvester and Paley-I blocks")
    m, p = f
    h_block = _hadamard(m)
    scale = 1.0 / math.sqrt(n)
    return h_block.float(), torch.kron(h_block, _hadamard(p)) * scale, scale
