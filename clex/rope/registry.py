"""The position encodings by spec `type`, each registered once by the module file that implements it (like HF
transformers' ROPE_INIT_FUNCTIONS, but what is registered is a module class, because CLEX has learned state).

A file in clex/rope/ declares the encoding's pydantic spec (a `clex.spec.Strict` with `type: Literal["<name>"]`,
its own keys and validators) and registers the module class with `@register(<Spec>)`. The class builds itself
from a validated spec (`PositionEncoding.from_spec`) and its class attributes are the encoding's traits
(`rotary`, `inference_only`), read from here by clex/config.py's Experiment checks. clex/config.py also builds
`Experiment.rope`'s discriminated union from this registry (`position_spec`), in registration order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Callable, Union, get_args

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from .base import PositionEncoding


@dataclass(frozen=True)
class Registration:
    """One encoding: its spec class and the module class that builds from it and carries its traits."""

    spec: type[BaseModel]
    module: type[PositionEncoding]

    @property
    def rotary(self) -> bool:
        return self.module.rotary

    @property
    def inference_only(self) -> bool:
        return self.module.inference_only


REGISTRY: dict[str, Registration] = {}
_listeners: list[Callable[[], None]] = []


def spec_type(spec: type[BaseModel]) -> str:
    """The tag of a spec class: the one value of its `type: Literal[...]` field."""
    field = spec.model_fields.get("type")
    tags = get_args(field.annotation) if field is not None else ()
    if len(tags) != 1 or not isinstance(tags[0], str):
        raise TypeError(f"{spec.__name__}: a position spec needs a field `type: Literal['<name>']`")
    return tags[0]


def register(spec: type[BaseModel]):
    """Class decorator: register the decorated PositionEncoding subclass for `spec` (each type once)."""

    def deco(module: type[PositionEncoding]) -> type[PositionEncoding]:
        name = spec_type(spec)
        if name in REGISTRY:
            raise ValueError(f"position encoding {name!r} is already registered ({REGISTRY[name].module.__name__})")
        REGISTRY[name] = Registration(spec, module)
        _changed()
        return module

    return deco


def unregister(name: str) -> None:
    """Remove a registration (a test's encoding, when the test ends)."""
    del REGISTRY[name]
    _changed()


def on_change(listener: Callable[[], None]) -> None:
    """Call `listener()` after every later (un)registration: config.py rebuilds `Experiment.rope` with it."""
    _listeners.append(listener)


def _changed() -> None:
    for listener in _listeners:
        listener()


def position_spec():
    """The discriminated union over `type` of every registered spec, in registration order (its JSON schema's
    order, and the order of the allowed tags an unknown type's error lists)."""
    return Annotated[Union[tuple(r.spec for r in REGISTRY.values())], Field(discriminator="type")]


def types_with(trait: str, value: bool = True) -> list[str]:
    """The registered types whose module class has `trait` == value, in registration order (for messages)."""
    return [name for name, r in REGISTRY.items() if getattr(r, trait) == value]


def build_position_encoding(spec, *, head_dim: int, base: float, train_len: int) -> PositionEncoding:
    """The module for a validated spec (`spec.type`); an unknown type raises ValueError naming the allowed ones."""
    if spec.type not in REGISTRY:
        raise ValueError(f"rope.type: {spec.type!r} is unknown; allowed: {sorted(REGISTRY)}")
    return REGISTRY[spec.type].module.from_spec(spec, head_dim=head_dim, base=base, train_len=train_len)
