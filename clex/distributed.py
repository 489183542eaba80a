"""Scale-out settings of training: activation checkpointing and the FSDP strategy, for our `Decoder` and for
`HFDecoder` (docs/scaling.md).

- `decoder_layers(model)`: the decoder layer classes (our `Block`; an HF model's own layer class, read from the
  model, so LLaMA, Mistral and Qwen2 need no entry each). They are FSDP's units and what checkpointing recomputes.
- `encoding_unit(model)`: the module the forward calls to get cos/sin (our Decoder's `rope`; HFDecoder's
  `RotaryAdapter`, since the HF model calls it and not `HFDecoder.rope`). FSDP wraps it as its own unit with
  `mixed_precision=None` (no cast: the encoding computes with its float32 weights under bf16-mixed, where
  Lightning's FSDP policy casts every other unit's parameters to bf16, and under bf16-true) and NO_SHARD (its
  few parameters stay whole on every rank, so code that calls the encoding outside the forward, e.g. the basis
  monitor, the solver check and `frequency_table`, reads real weights). Each FSDP flat parameter holds one dtype;
  the encoding's float32 parameters are alone in theirs.
- `apply_activation_checkpointing(model, strategy)`: outside FSDP, our Decoder's flag, or HF's
  `activation_checkpointing_enable` (transformers 5's name for `gradient_checkpointing_enable`; non-reentrant).
  Under FSDP the strategy's `activation_checkpointing_policy` wraps the same layer classes instead, and this does
  nothing (no double wrapping).
- `fsdp_strategy(cfg, model)`: Lightning's FSDPStrategy so configured: FULL_SHARD, full state dicts (rank 0
  gets the whole model, `model_state_dict`).
"""
from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import CustomPolicy

from clex.config import TrainerConfig

ENCODING_UNIT = {"mixed_precision": None, "sharding_strategy": ShardingStrategy.NO_SHARD}  # FSDP kwargs overrides


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "hf")  # clex.hf.HFDecoder (not imported: it pulls in transformers)


def decoder_layers(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The class(es) of the model's decoder layers: `Block` for our Decoder, the HF base model's layer class."""
    layers = model.hf.base_model.layers if _is_hf(model) else model.blocks
    return tuple(dict.fromkeys(type(layer) for layer in layers))


def encoding_unit(model: nn.Module) -> nn.Module:
    """The module whose forward yields cos/sin: Decoder.rope, or the RotaryAdapter inside the HF model."""
    return model.rotary if _is_hf(model) else model.rope


def apply_activation_checkpointing(model: nn.Module, strategy: object) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpointing), unless the strategy
    is FSDP (its activation_checkpointing_policy does it; `fsdp_strategy`)."""
    if isinstance(strategy, FSDPStrategy):
        return
    if _is_hf(model):
        model.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing = True


def wrap_policy(model: nn.Module) -> CustomPolicy:
    """FSDP units: each decoder layer (the root's settings), the encoding (`ENCODING_UNIT`); the rest is the root."""
    layers, unit = decoder_layers(model), encoding_unit(model)

    def policy(module: nn.Module) -> bool | dict:
        if module is unit:
            return dict(ENCODING_UNIT)
        return isinstance(module, layers)

    return CustomPolicy(policy)


def fsdp_strategy(cfg: TrainerConfig, model: nn.Module) -> FSDPStrategy:
    """Lightning's FSDPStrategy for `model`: `wrap_policy`, FULL_SHARD, full state dicts, and with
    trainer.activation_checkpointing each decoder layer checkpointed by Lightning."""
    return FSDPStrategy(auto_wrap_policy=wrap_policy(model), sharding_strategy="FULL_SHARD", state_dict_type="full",
                        activation_checkpointing_policy=set(decoder_layers(model)) if cfg.activation_checkpointing
                        else None)


def model_state_dict(trainer) -> dict[str, torch.Tensor]:
    """The trained model's full state dict (keys as `model.state_dict()`'s). Every rank must call it: under FSDP it
    gathers the shards (a collective) and only rank 0 gets the tensors; elsewhere it is the module's own
    `state_dict()`, with its version metadata, so `torch.save` writes the bytes it wrote before FSDP existed
    (same checkpoint_sha256 for the same weights)."""
    if not isinstance(trainer.strategy, FSDPStrategy):
        return trainer.lightning_module.model.state_dict()
    state = trainer.strategy.lightning_module_state_dict()
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
