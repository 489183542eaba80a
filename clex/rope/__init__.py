"""Position encodings: each file here declares an encoding's spec (its `rope:` keys and checks), its module and
its traits, and registers them once with `@register(<Spec>)` (clex/rope/registry.py); `build_position_encoding`
turns a validated spec into its module.

The files below are imported in this order, which is the registration order and so the order of the members of
clex.config.PositionSpec (its JSON schema, and the allowed tags an unknown `rope.type` is told). Any other file
in this folder is imported after them, so that a new encoding needs nothing but its own file.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (
    PlainRope, PositionEncoding, RopeSpec, apply_rotary, default_inv_freq, ntk_base, ntk_inv_freq, rotary_tables,
    rotate_half,
)
from .ode import (
    REFERENCE_SOLVER, Clex, ClexDynamics, ClexSpec, ContinuousClex, DiscreteClex, SolverSpec, effective_step_scale,
    max_rel_error, reference_table, solver_fix, time_embedding,
)
from .scaling import (
    BaseChange, BaseChangeSpec, DynamicNtk, DynamicNtkSpec, LinearScaling, NtkScaling, NtkSpec, PiSpec, Yarn, YarnSpec,
    codellama_base,
)
from .bias import Alibi, AlibiSpec, BiasEncoding, Sandwich, SandwichSpec, alibi_slopes
from .positions import POSITION_SAMPLING, RandomPos, RandomPosSpec, random_positions, sample_scale, training_positions
from .registry import (
    REGISTRY, Registration, build_position_encoding, on_change, position_spec, register, types_with, unregister,
)

for _module in pkgutil.iter_modules(__path__):  # a new encoding's file registers itself when imported
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Alibi", "AlibiSpec", "BiasEncoding", "RandomPos", "RandomPosSpec", "Sandwich", "SandwichSpec", "alibi_slopes",
    "random_positions", "BaseChange", "BaseChangeSpec", "DynamicNtk", "DynamicNtkSpec", "LinearScaling", "NtkScaling",
    "NtkSpec", "PiSpec", "Yarn", "YarnSpec", "codellama_base", "ntk_base", "POSITION_SAMPLING", "Clex",
    "ClexDynamics", "ClexSpec", "ContinuousClex", "DiscreteClex", "PlainRope", "REFERENCE_SOLVER", "RopeSpec",
    "SolverSpec", "effective_step_scale", "max_rel_error", "reference_table", "solver_fix", "PositionEncoding",
    "apply_rotary", "build_position_encoding", "default_inv_freq", "ntk_inv_freq", "on_change", "position_spec",
    "REGISTRY", "Registration", "register", "rotary_tables", "rotate_half", "sample_scale", "time_embedding",
    "training_positions", "types_with", "unregister",
]
