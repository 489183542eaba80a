"""The pydantic base of every params section and position-encoding spec (torch-free, so that clex/rope's spec
classes and clex/config.py's sections share it without an import cycle)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors (a typo must not silently fall back to a default); values are not coerced
    (strict: `true` is not the integer 1, nor the string '3' a number; an integer still passes as a float), and
    no float may be NaN or infinite (`.inf` would pass every `ge`/`gt` bound)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
