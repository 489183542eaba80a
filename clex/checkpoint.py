"""A study's models without Lightning: build the model of an experiment, load a stage's checkpoint into it.

The one place that dispatches on `model.source`: our `Decoder` (clex/model.py; weights in `model.pt`) or a
Hugging Face checkpoint with our position encoding (`HFDecoder`, clex/hf.py; the adopted checkpoint for the base
model, a fine-tune's `hf/` folder after that). Training (clex/train.py) builds and loads through these; evaluation
and generation import only this module (torch, no Lightning; transformers only for a Hugging Face study), so an
evaluation stage does not pay for importing the trainer.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from clex import attention, layout
from clex.attention import attention_for
from clex.config import Experiment, RopeSpec, Study
from clex.model import Decoder
from clex.rope import REGISTRY, build_position_encoding

PLAIN = Experiment(name="base", description="plain RoPE base model", rope=RopeSpec(type="rope"))
HF_FOLDER, SOURCE_JSON = "hf", "source.json"  # a Hugging Face fine-tune's weights; the adopted checkpoint's record


def vocab_size(study: Study) -> int:
    return json.loads((layout.data_dir(study.root) / "manifest.json").read_text())["vocab_size"]


def body_dtype(study: Study) -> torch.dtype:
    """A Hugging Face model's body dtype: bf16 under trainer.precision bf16-true, else float32 (the encoding
    stays float32 either way, clex/hf.py)."""
    return torch.bfloat16 if study.params.trainer.precision == "bf16-true" else torch.float32


def attn_implementation(study: Study, experiment: Experiment) -> str:
    """model.attn_implementation, with auto resolved: flash_attention_2 when flash_attn imports (the import our
    Decoder's attention already tries, clex/attention.py), training runs on CUDA (`TrainerConfig.uses_cuda`) and the
    encoding is rotary (a bias encoding needs a float mask), else sdpa."""
    chosen = study.params.model.attn_implementation
    if chosen != "auto":
        return chosen
    flash = attention.flash_attn_func is not None and study.params.trainer.uses_cuda()
    return "flash_attention_2" if flash and REGISTRY[experiment.rope.type].rotary else "sdpa"


def _hf_model(study: Study, experiment: Experiment, path: Path):
    from clex.hf import build_hf_model

    model = build_hf_model(study.params, experiment, path=path, dtype=body_dtype(study),
                           attn_implementation=attn_implementation(study, experiment))
    return model.train()  # from_pretrained returns eval mode; a new Decoder is in train mode (evaluation sets eval)


def build_model(study: Study, experiment: Experiment):
    """The untrained model of `experiment`: a fresh Decoder, or the study's Hugging Face checkpoint with a fresh
    encoding (CLEX at its prior)."""
    m = study.params.model
    if m.source == "hf":
        from clex.hf import checkpoint_dir

        return _hf_model(study, experiment, checkpoint_dir(m, study.root))
    rope = build_position_encoding(experiment.rope, head_dim=m.head_dim, base=m.rope_base, train_len=m.train_len)
    return Decoder(m, vocab_size(study), rope, attention_for(experiment, m.train_len))


def checkpoint_path(study: Study, folder: Path) -> Path:
    """The weights a training stage's output `folder` holds: its model.pt (decoder), its hf/ folder (a Hugging Face
    fine-tune) or, for the adopted base model (source.json, no weights of its own), the checkpoint folder."""
    folder = Path(folder)
    if study.params.model.source == "decoder":
        return folder / "model.pt"
    if not (folder / HF_FOLDER).exists() and (folder / SOURCE_JSON).exists():
        from clex.hf import checkpoint_dir

        return checkpoint_dir(study.params.model, study.root)
    return folder / HF_FOLDER


def load_checkpoint(study: Study, experiment: Experiment, ckpt: Path):
    """The model of `experiment` with weights from ckpt (`checkpoint_path`). The encoding's state comes from ckpt
    where it fits `experiment`'s own encoding: the Decoder's rope.* entries that its encoding has; a Hugging Face
    folder's clex_rope.pt when the spec saved beside it (clex_rope.json) is `experiment`'s. So an experiment that
    reuses another's checkpoint with an inference-time encoding (Dynamic NTK on naive_ft's) runs its own."""
    if study.params.model.source == "hf":
        from clex.hf import ROPE_SPEC, ROPE_WEIGHTS

        model = _hf_model(study, experiment, ckpt)
        spec = Path(ckpt) / ROPE_SPEC
        if spec.exists() and json.loads(spec.read_text())["rope"] == experiment.rope.model_dump(mode="json"):
            model.rope.load_state_dict(torch.load(Path(ckpt) / ROPE_WEIGHTS, map_location="cpu", weights_only=True))
        return model
    model = build_model(study, experiment)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    own_rope = {k for k in model.state_dict() if k.startswith("rope.")}
    state = {k: v for k, v in state.items() if not k.startswith("rope.") or k in own_rope}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("rope.") for k in missing):
        raise RuntimeError(f"{ckpt}: does not fit the model (missing {missing}, unexpected {unexpected})")
    return model


def for_inference(study: Study, model) -> tuple[torch.nn.Module, contextlib.AbstractContextManager, dict]:
    """`model` placed as its training ran (trainer.accelerator, trainer.precision), the context its evaluation
    forwards run in, and {device, precision} for the record. CUDA when the accelerator allows it and a GPU is
    visible, else the CPU. bf16-true casts the body to bf16; bf16-mixed / 16-mixed autocast, as Lightning does in
    training; 32-true runs float32. The encoding stays float32 in every case (clex/model.py `_keep_fp32`). The
    default CPU study is unchanged: CPU, 32-true, no autocast."""
    cfg = study.params.trainer
    device, precision = torch.device("cuda" if cfg.uses_cuda() else "cpu"), cfg.resolved_precision()
    model = model.to(device)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    mixed = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    context = torch.autocast(device.type, dtype=mixed) if mixed else contextlib.nullcontext()
    return model, context, {"device": device.type, "precision": precision}


def checkpoint_source(study: Study, experiment: str, seed: int | None) -> tuple[Experiment, Path, int]:
    """(experiment, output folder of the run that trained its weights (model.pt or hf/, run.json), seed) of 'base'
    or of one fine-tuned run (the reused experiment's run for `reuse:`); the base model's seed is pretrain.seed."""
    if experiment == "base":
        return PLAIN, layout.base_dir(study.root), study.params.pretrain.seed
    return study.experiment(experiment), layout.finetune_dir(study.root, study.checkpoint_of(experiment), seed), seed
