"""A position encoding is one file: its spec, checks, traits and module, registered once (clex/rope/registry.py).

A toy encoding defined here, and registered by the test only, goes through load_study, the Experiment checks
and build_position_encoding like the real ones; its class attributes decide `reuse` and `streaming`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from pydantic import Field, ValidationError

from clex.config import Experiment, ParamsError, load_study
from clex.rope import (
    REGISTRY, BaseChange, NtkScaling, PlainRope, RandomPos, build_position_encoding, default_inv_freq, register,
    types_with, unregister,
)
from clex.spec import Strict
from conftest import make_study, tiny_params

ALLOWED_TAGS = "'rope', 'clex', 'pi', 'ntk', 'dynamic_ntk', 'yarn', 'base_change', 'alibi', 'sandwich', 'randompos'"


class ToySpec(Strict):
    """Plain RoPE with every frequency divided by `scale`."""

    type: Literal["toy"]
    scale: float = Field(2.0, gt=0, allow_inf_nan=False)


class Toy(PlainRope):
    def __init__(self, head_dim: int, base: float, train_len: int, scale: float):
        super().__init__(head_dim, base, train_len)
        self.scale = scale

    @classmethod
    def from_spec(cls, spec: ToySpec, *, head_dim: int, base: float, train_len: int) -> Toy:
        return cls(head_dim, base, train_len, spec.scale)

    def inv_freq(self, t: int = 1) -> torch.Tensor:
        return self.base_inv_freq / self.scale


@pytest.fixture
def register_toy():
    """`register_toy(**traits)` registers a Toy subclass with those class attributes; unregistered at the end."""
    yield lambda **traits: register(ToySpec)(type("ToyEncoding", (Toy,), traits))
    if "toy" in REGISTRY:
        unregister("toy")


def experiment(rope: dict, **keys) -> Experiment:
    return Experiment.model_validate({"name": "x", "rope": rope, **keys})


def study_with_toy(tmp_path, rope: dict):
    study = make_study(tmp_path / "study")
    (study / "experiments" / "toy.yaml").write_text(yaml.safe_dump({"description": "a toy", "rope": rope}))
    params = tiny_params()
    params["experiments"].append("toy")
    (study / "params.yaml").write_text(yaml.safe_dump(params))
    return study


def test_a_registered_encoding_validates_and_builds(tmp_path, register_toy):
    cls = register_toy()
    exp = load_study(study_with_toy(tmp_path, {"type": "toy", "scale": 4})).experiment("toy")
    assert exp.rope == ToySpec(type="toy", scale=4.0) and exp.model_dump()["rope"] == {"type": "toy", "scale": 4.0}
    rope = build_position_encoding(exp.rope, head_dim=16, base=10000.0, train_len=32)
    assert type(rope) is cls and rope.scale == 4.0
    assert torch.equal(rope.inv_freq(), default_inv_freq(16, 10000.0) / 4)


def test_a_registered_encodings_keys_are_checked_and_named(tmp_path, register_toy):
    register_toy()
    with pytest.raises(ParamsError) as bad:
        load_study(study_with_toy(tmp_path, {"type": "toy", "scale": -1}))
    assert str(bad.value) == "experiments/toy.yaml: rope.scale: got -1; Input should be greater than 0"
    with pytest.raises(ValidationError, match=r"expected tags: .*'randompos', 'toy'"):
        experiment({"type": "toi"})


def test_unregistering_removes_it_from_the_union(register_toy):
    register_toy()
    unregister("toy")
    assert "toy" not in REGISTRY
    with pytest.raises(ValidationError) as bad:
        experiment({"type": "toy"})
    assert f"does not match any of the expected tags: {ALLOWED_TAGS}" in str(bad.value)


def reusing_toy(tmp_path) -> Path:
    """A study whose `toy` experiment evaluates naive_ft's (plain RoPE) checkpoints: `reuse: naive_ft`."""
    study = make_study(tmp_path / "study")
    (study / "experiments" / "toy.yaml").write_text(yaml.safe_dump({"rope": {"type": "toy"}, "reuse": "naive_ft"}))
    params = tiny_params()
    params["reuse_experiments"].append("toy")
    (study / "params.yaml").write_text(yaml.safe_dump(params))
    return study


def test_reuse_asks_the_registry_for_inference_only_encodings(tmp_path, register_toy):
    """`reuse:` of a plain-RoPE fine-tune is the same training only for an inference-time encoding (the trait)."""
    register_toy()  # not inference-only: a PlainRope subclass does not inherit it
    study = reusing_toy(tmp_path)
    with pytest.raises(ParamsError, match=r"reuse: 'naive_ft' trains differently .*exp.rope.type: 'toy' vs 'rope'.*"
                                          r"inference-time rope.type \['rope', 'dynamic_ntk'\]"):
        load_study(study)
    unregister("toy")
    register_toy(inference_only=True)
    assert load_study(study).experiment("toy").reuse == "naive_ft"
    assert types_with("inference_only") == ["rope", "dynamic_ntk", "toy"]


def test_streaming_asks_the_registry_for_rotary_encodings(register_toy):
    register_toy()
    assert experiment({"type": "toy"}, streaming={}).streaming is not None
    unregister("toy")
    register_toy(rotary=False)
    with pytest.raises(ValidationError, match=r"not rope.type 'toy'; allowed: any rope.type except "
                                              r"'alibi', 'sandwich' and 'toy'"):
        experiment({"type": "toy"}, streaming={})


def test_the_study_encodings_traits():
    """The traits the study's checks rely on, each stated once on its module class."""
    assert types_with("inference_only") == ["rope", "dynamic_ntk"]
    assert types_with("rotary", False) == ["alibi", "sandwich"]
    assert not any(c.inference_only for c in (NtkScaling, BaseChange, RandomPos))  # PlainRope's is not inherited
    with pytest.raises(ValidationError, match=r"streaming: needs a rotary encoding, not rope.type 'alibi'; "
                                              r"allowed: any rope.type except 'alibi' and 'sandwich'"):
        experiment({"type": "alibi"}, streaming={})


def test_a_type_registers_once_and_needs_a_literal_tag():
    with pytest.raises(ValueError, match=r"'rope' is already registered \(PlainRope\)"):
        register(REGISTRY["rope"].spec)(Toy)

    class Untagged(Strict):
        type: str

    with pytest.raises(TypeError, match="Untagged: a position spec needs a field `type: Literal"):
        register(Untagged)(Toy)
    assert list(REGISTRY) == [t.strip("' ") for t in ALLOWED_TAGS.split(",")]
