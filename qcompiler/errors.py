"""Exceptions raised by qcompiler.

- ``RecipeError``: bad user input (a recipe field, a preset name, calibration data).
- ``UnsupportedError``: valid input that a layer or backend cannot honour; the fallback
  pass catches it and records the reason.
- ``PassError``: a pass failed or broke an invariant; names the pass and those before it.
- ``CheckpointError``: a saved model is corrupt, incomplete or not written by qcompiler.
"""

from __future__ import annotations

__all__ = ["QCompilerError", "RecipeError", "CalibrationError", "UnsupportedError", "PassError", "CheckpointError"]


class QCompilerError(Exception):
    """Base class of every qcompiler error."""


class RecipeError(QCompilerError, ValueError):
    """A recipe, preset name or recipe field is invalid."""


class CalibrationError(QCompilerError, ValueError):
    """Calibration data is missing, of the wrong type or of the wrong shape."""


class CheckpointError(QCompilerError, ValueError):
    """A saved model (folder, safetensors file, its metadata or config.json) is corrupt, incomplete
    or not one qcompiler wrote; the message names the file and the key or layer."""


class UnsupportedError(QCompilerError):
    """A valid request that this layer, op or backend cannot carry out."""


class PassError(QCompilerError):
    """A pass failed; the message names it and the passes that ran before it."""

    def __init__(self, pass_name: str, before: tuple[str, ...], cause: BaseException):
        self.pass_name = pass_name
        self.before = before
        ran = ", ".join(before) if before else "none"
        super().__init__(f"pass {pass_name!r} failed (passes run before it: {ran}): "
                         f"{type(cause).__name__}: {cause}")
