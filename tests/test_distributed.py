"""Scale-out (clex/distributed.py, docs/scaling.md): activation checkpointing, the FSDP strategy's configuration and
torch FSDP itself on CPU (gloo, 2 spawned processes), bf16-true on CPU.

References are independent runs: the same model without checkpointing, the same batch in one process without FSDP.
Tolerances: checkpointing recomputes the same float32 ops in the same order, so loss and gradients are equal bit for
bit (asserted with torch.equal). FSDP averages the two ranks' gradients by an all-reduce, a different summation order
from one process's mean over the whole batch: gradients rtol 1e-5 / atol 1e-7 (float32 rounding).
"""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.plugins.precision import FSDPPrecision, HalfPrecision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch.distributed.fsdp import ShardingStrategy
from torch.utils.data import DataLoader

from clex.config import FinetuneConfig, TrainerConfig
from clex.distributed import ENCODING_UNIT, apply_activation_checkpointing, decoder_layers, fsdp_strategy
from clex.hf import from_decoder
from clex.lit import LitDecoder
from clex.model import Decoder
from clex.train import resolve_trainer
from distributed_helpers import (
    CFG, CLEX, V, DrawRecorder, batch, clex_decoder, clex_model, count_forwards, free_port, fsdp_worker, loss_and_grads,
)

# ------------------------------------------------------------------ activation checkpointing
@pytest.mark.parametrize("source", ["decoder", "hf"])
def test_activation_checkpointing_recomputes_each_layer_with_equal_loss_and_gradients(source):
    """CLEX at t > 1 with random positions: every layer runs twice with checkpointing (forward, recompute in
    backward), once without; loss and every gradient are bit-for-bit equal."""
    plain, checkpointed = clex_model(source), clex_model(source)
    apply_activation_checkpointing(checkpointed, "auto")
    x = batch()

    def first_norms(model):  # each layer's first module (HF checkpoints a layer's forward, inside its own hooks)
        return [b.attn_norm for b in model.blocks] if source == "decoder" else [
            layer.input_layernorm for layer in model.hf.model.layers]

    counts = [count_forwards(m) for m in first_norms(plain)]
    counts_ckpt = [count_forwards(m) for m in first_norms(checkpointed)]
    (loss, grads), (loss_c, grads_c) = loss_and_grads(plain, x), loss_and_grads(checkpointed, x)
    assert [c[0] for c in counts] == [1, 1] and [c[0] for c in counts_ckpt] == [2, 2]  # forward + recompute
    assert torch.equal(loss, loss_c)
    assert grads.keys() == grads_c.keys() and any(n.startswith("rope.") for n in grads)
    assert [n for n in grads if not torch.equal(grads[n], grads_c[n])] == []
    with torch.no_grad():  # no recompute without grad, nor in eval
        checkpointed(x)
    checkpointed.eval()
    checkpointed(x)
    assert [c[0] for c in counts_ckpt] == [4, 4]


def test_activation_checkpointing_is_left_to_the_fsdp_strategy():
    model = clex_decoder()
    apply_activation_checkpointing(model, fsdp_strategy(TrainerConfig(activation_checkpointing=True), model))
    assert model.activation_checkpointing is False


# ------------------------------------------------------------------ the strategies
def test_fsdp_strategy_wraps_layers_and_keeps_the_encoding_whole_and_fp32():
    for model in (clex_decoder(), from_decoder(clex_decoder(), CLEX)):
        strategy = resolve_trainer(TrainerConfig(strategy="fsdp", activation_checkpointing=True), model)["strategy"]
        assert isinstance(strategy, FSDPStrategy)
        assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD and strategy._state_dict_type == "full"
        layer = type(model.blocks[0]) if isinstance(model, Decoder) else type(model.hf.model.layers[0])
        assert decoder_layers(model) == (layer,) and strategy._activation_checkpointing_kwargs[
            "auto_wrap_policy"]._module_classes == {layer}
        decide = strategy.kwargs["auto_wrap_policy"]._lambda_fn
        units = {name: decide(m) for name, m in model.named_modules(remove_duplicate=False) if decide(m)}
        n = CFG.n_layers
        prefix = "blocks" if isinstance(model, Decoder) else "hf.model.layers"
        layers = [f"{prefix}.{i}" for i in range(n)]
        unit = "rope" if isinstance(model, Decoder) else "hf.model.rotary_emb"  # what the forward calls for cos/sin
        assert units == {**{name: True for name in layers}, unit: ENCODING_UNIT}
        assert ENCODING_UNIT == {"mixed_precision": None, "sharding_strategy": ShardingStrategy.NO_SHARD}
    # every other unit computes in bf16 under both bf16 precisions: why the encoding's unit opts out (None: no cast)
    for precision in ("bf16-mixed", "bf16-true"):
        assert FSDPPrecision(precision).mixed_precision_config.param_dtype == torch.bfloat16
    without = fsdp_strategy(TrainerConfig(strategy="fsdp"), clex_decoder())
    assert without._activation_checkpointing_kwargs == {}


def test_ddp_keeps_find_unused_parameters_for_a_learned_encoding():
    strategy = resolve_trainer(TrainerConfig(strategy="ddp_spawn"), clex_decoder())["strategy"]
    assert isinstance(strategy, DDPStrategy) and strategy._ddp_kwargs["find_unused_parameters"]


# ------------------------------------------------------------------ torch FSDP on CPU (gloo, 2 processes)
@pytest.mark.parametrize("source", ["decoder", pytest.param("hf", marks=pytest.mark.slow)])
def test_fsdp_on_cpu_matches_one_process_and_keeps_the_encoding_fp32(tmp_path, source):
    """torch's FSDP with our wrap policy, 2 gloo processes on CPU, one training step of a tiny Decoder with CLEX
    (slow: the same in an HF LLaMA, ~50 s): losses and averaged gradients equal the single-process ones (32-true);
    under Lightning's bf16 policy the encoding still computes with float32 weights, and θ(t) read outside the
    forward is the unwrapped model's."""
    mp.spawn(fsdp_worker, args=(free_port(), str(tmp_path), source), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    reference = clex_model(source)
    halves = [loss_and_grads(reference, batch(size=4)[2 * r: 2 * r + 2]) for r in range(2)]
    for r in range(2):
        assert torch.equal(ranks[r]["32-true"]["loss"], halves[r][0])
    for precision in ("32-true", "bf16-mixed"):
        assert set(ranks[0][precision]["seen"]) == {torch.float32}
        assert torch.equal(ranks[0][precision]["theta"], ranks[1][precision]["theta"])
    mean = {n: (halves[0][1][n] + halves[1][1][n]) / 2 for n in halves[0][1]}
    got = ranks[0]["32-true"]["grads"]
    assert got.keys() == mean.keys()
    for n in mean:
        torch.testing.assert_close(got[n], mean[n], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert torch.equal(ranks[0]["32-true"]["theta"], reference.rope.inv_freq(3))
    bf16 = ranks[0]["bf16-mixed"]
    assert torch.isfinite(bf16["loss"]) and bf16["loss"] != ranks[0]["32-true"]["loss"]  # the body did run in bf16


# ------------------------------------------------------------------ Lightning: t on every rank, bf16-true on CPU
def fit(lit: LitDecoder, steps: int, trainer_cfg: TrainerConfig, callbacks=(), accumulate: int = 1, batch_size: int = 4):
    data = torch.randint(0, V, (64, CFG.train_len + 1), generator=torch.Generator().manual_seed(0))
    kwargs = resolve_trainer(trainer_cfg, lit.model)
    trainer = L.Trainer(**{**kwargs, "plugins": None}, max_steps=steps, accumulate_grad_batches=accumulate,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(lit, DataLoader(data, batch_size=batch_size))
    return trainer


def test_ranks_draw_the_same_t_and_positions_and_end_with_equal_weights(tmp_path):
    """2 CPU processes (ddp_spawn, gloo), accumulate 2: every (step, micro-batch) draws the same t and positions on
    both ranks, without communication (clex.lit.step_generator), and both ranks end with the same weights."""
    lit = LitDecoder(clex_decoder(), FinetuneConfig(steps=3, batch_size=4, lr=1e-3, accumulate=2), seed=5,
                     position_sampling="random")
    fit(lit, 3, TrainerConfig(accelerator="cpu", devices=2, strategy="ddp_spawn", precision="32-true"),
        [DrawRecorder(str(tmp_path))], accumulate=2, batch_size=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    draws = [r["draws"] for r in ranks]
    assert [(s, m) for s, m, _, _ in draws[0]] == [(s, m) for s in range(3) for m in range(2)]
    assert len({t for _, _, t, _ in draws[0]}) > 1  # t varies over the micro-batches
    for a, b in zip(*draws):
        assert a[:3] == b[:3] and torch.equal(a[3], b[3])
    first, second = (r["state"] for r in ranks)
    start = clex_decoder().state_dict()
    assert any(not torch.equal(first[k], start[k]) for k in first if k.startswith("rope."))  # the encoding trained
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("source", ["decoder", "hf"])
def test_bf16_true_on_cpu_trains_with_a_float32_encoding(source):
    """Lightning's bf16-true casts the model to bf16; the encoding stays float32 (Decoder and HFDecoder alike) and
    the losses stay finite."""
    model = clex_model(source)
    lit = LitDecoder(model, FinetuneConfig(steps=2, batch_size=4, lr=1e-3), seed=5, position_sampling="random")
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, lit, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    fit(lit, 2, TrainerConfig(accelerator="cpu", precision="bf16-true"), [Losses()])
    body = model.embed.weight if source == "decoder" else model.hf.model.embed_tokens.weight
    assert body.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.rope.parameters())
    assert model.rope.base_inv_freq.dtype == torch.float32
    assert len(losses) == 2 and all(map(math.isfinite, losses))
    model.rope.train()  # no θ(t) cache (eval mode caches the table)
    with torch.no_grad():  # bf16-true's forward makes bf16 the default dtype; θ(t) is still the float32 one
        reference = model.rope.inv_freq(3)
        with HalfPrecision("bf16-true").forward_context():
            assert torch.equal(model.rope.inv_freq(3), reference)
