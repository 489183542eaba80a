"""Where and in what precision an evaluation runs (clex.checkpoint.for_inference): the training device and
precision, the encoding float32 throughout, and the default CPU study unchanged."""
from __future__ import annotations

import pytest
import torch

from clex.checkpoint import for_inference
from clex.config import EvalConfig, TrainerConfig, load_study
from clex.evaluate import perplexity
from conftest import REPO
from test_hf import decoder


def study_with(**trainer):
    study = load_study(REPO)
    params = study.params.model_copy(update={"trainer": TrainerConfig(**trainer)})
    return study.model_copy(update={"params": params})


def test_resolution_follows_the_accelerator_and_a_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TrainerConfig().uses_cuda() and TrainerConfig().resolved_precision() == "bf16-mixed"
    assert not TrainerConfig(accelerator="cpu").uses_cuda()
    assert TrainerConfig(accelerator="cpu").resolved_precision() == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not TrainerConfig(accelerator="gpu").uses_cuda()
    assert TrainerConfig(precision="bf16-true").resolved_precision() == "bf16-true"


def test_default_cpu_study_evaluates_as_before():
    model = decoder("clex")
    docs = torch.randint(0, 97, (2, 64))
    before = perplexity(model, docs, 64, EvalConfig(batch_size=2), "progressive")
    placed, context, record = for_inference(study_with(), decoder("clex"))
    with context:
        after = perplexity(placed, docs, 64, EvalConfig(batch_size=2), "progressive")
    assert record == {"device": "cpu", "precision": "32-true"} and after == before


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_evaluation_keeps_the_encoding_float32(precision):
    docs = torch.randint(0, 97, (2, 64))
    full = perplexity(decoder("clex"), docs, 64, EvalConfig(batch_size=2), "progressive")["ppl"]
    model, context, record = for_inference(study_with(accelerator="cpu", precision=precision), decoder("clex"))
    assert record == {"device": "cpu", "precision": precision}
    assert all(p.dtype == torch.float32 for p in model.rope.parameters())
    body = model.embed.weight.dtype
    assert body == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    with context:
        logits = model(docs[:, :16])
        ppl = perplexity(model, docs, 64, EvalConfig(batch_size=2), "progressive")["ppl"]
    assert logits.dtype == torch.bfloat16  # the body's matmuls ran in bf16 (cast or autocast)
    assert ppl != full and abs(ppl / full - 1) < 0.05  # bf16 rounding, not another model
