"""Position encodings, registered by the spec's `type` (like HF's ROPE_INIT_FUNCTIONS, but the
factories return modules because CLEX has learned state).

A factory has the signature `(spec, *, head_dim, base, train_len) -> PositionEncoding`, where
`spec` is a validated config object (one of clex.config.PositionSpec; read by attribute only).
"""
from __future__ import annotations

from typing import Callable

from .base import (
    PlainRope, PositionEncoding, apply_rotary, default_inv_freq, ntk_base, ntk_inv_freq, rotary_tables, rotate_half,
)
from .bias import Alibi, BiasEncoding, Sandwich, alibi_slopes
from .ode import (
    REFERENCE_SOLVER, ClexDynamics, ContinuousClex, DiscreteClex, effective_step_scale, max_rel_error, reference_table,
    solver_fix, time_embedding,
)
from .positions import POSITION_SAMPLING, RandomPos, random_positions, sample_scale, training_positions
from .scaling import BaseChange, DynamicNtk, LinearScaling, NtkScaling, Yarn, codellama_base

Factory = Callable[..., PositionEncoding]
ROPE_FACTORIES: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register a factory under a spec type name (each name once)."""

    def deco(factory: Factory) -> Factory:
        if name in ROPE_FACTORIES:
            raise ValueError(f"position encoding {name!r} is already registered")
        ROPE_FACTORIES[name] = factory
        return factory

    return deco


def build_position_encoding(spec, *, head_dim: int, base: float, train_len: int) -> PositionEncoding:
    """The module for `spec.type`; an unknown type raises ValueError naming the allowed ones."""
    if spec.type not in ROPE_FACTORIES:
        raise ValueError(f"rope.type: {spec.type!r} is unknown; allowed: {sorted(ROPE_FACTORIES)}")
    return ROPE_FACTORIES[spec.type](spec, head_dim=head_dim, base=base, train_len=train_len)


@register("rope")
def _plain_rope(spec, *, head_dim: int, base: float, train_len: int) -> PositionEncoding:
    return PlainRope(head_dim, base, train_len)


@register("clex")
def _clex(spec, *, head_dim: int, base: float, train_len: int) -> PositionEncoding:
    common = dict(width=spec.ode_width, act=spec.act)
    if spec.dynamics == "discrete":
        return DiscreteClex(head_dim, base, train_len, spec.t_max, **common)
    if spec.dynamics == "continuous":
        s = spec.solver
        embedding_base = base if spec.time_embedding_base == "model" else spec.time_embedding_base
        return ContinuousClex(
            head_dim, base, train_len, spec.t_max, constant_term=spec.constant_term, t_scale=spec.t_scale,
            method=s.method, variable=s.variable, step_size=s.step_size, rtol=s.rtol, atol=s.atol,
            time_embedding_base=embedding_base, **common,
        )
    raise ValueError(f"rope.dynamics: {spec.dynamics!r} is unknown; allowed: ['continuous', 'discrete']")


@register("pi")
def _pi(spec, *, head_dim: int, base: float, train_len: int) -> PositionEncoding:
    return LinearScaling(head_dim, base, train_len, spec.factor)


@register("ntk")
def _ntk(spec, *, head_dim: int, base: float, train_len: int) -> PositionEncoding:
    return NtkScaling(head_dim, base, train_len, spec.factor)


@register("dynamic_ntk")
def _dynamic_ntk(spec, *, head_dim: int, base: float, train_len: int) -> PositionEncoding:
    return DynamicNtk(head_dim, base, train_len, spec.factor)


@register("yarn")
def _yarn(spec, *, head_dim: int, base: float, train_len: int) -> PositionEncoding:
    return Yarn(head_dim, base, train_len, spec.factor, attn_factor=spec.attn_factor,
                beta_fast=spec.beta_fast, beta_slow=spec.beta_slow)


@register("base_change")
def _base_change(spec, *, head_dim: int, base: float, train_len: int) -> PositionEncoding:
    return BaseChange(head_dim, base, train_len, spec.base)


@register("alibi")
def _alibi(spec, *, head_dim: int, base: float, train_len: int) -> PositionEncoding:
    return Alibi(head_dim, base, train_len)


@register("sandwich")
def _sandwich(spec, *, head_dim: int, base: float, train_len: int) -> PositionEncoding:
    return Sandwich(head_dim, base, train_len, spec.d_bar)


@register("randompos")
def _randompos(spec, *, head_dim: int, base: float, train_len: int) -> PositionEncoding:
    return RandomPos(head_dim, base, train_len, spec.max_position_factor)


__all__ = [
    "Alibi", "BiasEncoding", "RandomPos", "Sandwich", "alibi_slopes", "random_positions",
    "BaseChange", "DynamicNtk", "LinearScaling", "NtkScaling", "Yarn", "codellama_base", "ntk_base",
    "ROPE_FACTORIES", "POSITION_SAMPLING", "ClexDynamics", "ContinuousClex", "DiscreteClex", "PlainRope",
    "REFERENCE_SOLVER", "effective_step_scale", "max_rel_error", "reference_table", "solver_fix",
    "PositionEncoding", "apply_rotary", "build_position_encoding", "default_inv_freq", "ntk_inv_freq",
    "register", "rotary_tables", "rotate_half", "sample_scale", "time_embedding", "training_positions",
]
