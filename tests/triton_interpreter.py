"""Imported first by the Triton test files: Triton's CPU interpreter where there is no GPU (set before
any ``@triton.jit`` runs), and the file skipped, with the reason, where triton is not installed."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: the Triton backend has nothing to test")
