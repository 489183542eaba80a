"""A study's models without Lightning: build the Decoder of an experiment, load a stage's checkpoint into it.

Training (clex/train.py) builds and loads through these; evaluation and generation import only this module
(torch, no Lightning), so an evaluation stage does not pay for importing the trainer.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from clex import layout
from clex.attention import attention_for
from clex.config import Experiment, RopeSpec, Study
from clex.model import Decoder
from clex.rope import build_position_encoding

PLAIN = Experiment(name="base", description="plain RoPE base model", rope=RopeSpec(type="rope"))


def vocab_size(study: Study) -> int:
    return json.loads((layout.data_dir(study.root) / "manifest.json").read_text())["vocab_size"]


def build_model(study: Study, experiment: Experiment) -> Decoder:
    m = study.params.model
    rope = build_position_encoding(experiment.rope, head_dim=m.head_dim, base=m.rope_base, train_len=m.train_len)
    return Decoder(m, vocab_size(study), rope, attention_for(experiment, m.train_len))


def load_checkpoint(study: Study, experiment: Experiment, ckpt: Path) -> Decoder:
    """A Decoder for `experiment` with weights from ckpt; rope.* entries come from ckpt when it has them."""
    model = build_model(study, experiment)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    own_rope = {k for k in model.state_dict() if k.startswith("rope.")}
    state = {k: v for k, v in state.items() if not k.startswith("rope.") or k in own_rope}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("rope.") for k in missing):
        raise RuntimeError(f"{ckpt}: does not fit the model (missing {missing}, unexpected {unexpected})")
    return model


def checkpoint_source(study: Study, experiment: str, seed: int | None) -> tuple[Experiment, Path, int]:
    """(experiment, folder of its model.pt and run.json, seed) of 'base' or of one fine-tuned run (the reused
    experiment's run for `reuse:`); the base model's seed is pretrain.seed."""
    if experiment == "base":
        return PLAIN, layout.base_dir(study.root), study.params.pretrain.seed
    return study.experiment(experiment), layout.finetune_dir(study.root, study.checkpoint_of(experiment), seed), seed
