"""Scale-out (clex/distributed.py, docs/scaling.md): activation checkpointing, the FSDP strategy's configuration and
torch FSDP itself on CPU (gloo, 2 spawned processes), bf16-true on CPU.

References are independent runs: the same model without checkpointing, the same batch in one process without FSDP.
Tolerances: checkpointing recomputes the same float32 ops in the same order, so loss and gradients are equal bit for
bit (asserted with torch.equal). FSDP averages the two ranks' gradients by an all-reduce, a different summation order
from one process's mean over the whole batch: gradients rtol 1e-5 / atol 1e-7 (float32 rounding).
"""
from __future__ import annotations

import os
import socket

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
from torch.utils.data import DataLoader

from clex.config import FinetuneConfig, ModelConfig, TrainerConfig
from clex.distributed import (
    ENCODING_UNIT, apply_activation_checkpointing, decoder_layers, encoding_unit, fsdp_strategy, wrap_policy,
)
from clex.hf import from_decoder
from clex.lit import LitDecoder, scale_and_positions
from clex.model import Block, Decoder
from clex.rope import ClexSpec, build_position_encoding
from clex.train import resolve_trainer
from test_rope import randomise

V = 50
CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, train_len=16)  # head dim 16
CLEX = ClexSpec(type="clex", t_max=4)


def clex_decoder(seed: int = 0) -> Decoder:
    """A tiny Decoder with CLEX whose ODE weights are random (θ(t) really depends on them)."""
    torch.manual_seed(seed)
    rope = build_position_encoding(CLEX, head_dim=CFG.head_dim, base=CFG.rope_base, train_len=CFG.train_len)
    model = Decoder(CFG, V, rope)
    randomise(rope, seed, scale=0.3)
    return model.train()


def batch(seed: int = 1, size: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (size, CFG.train_len + 1), generator=torch.Generator().manual_seed(seed))


def training_loss(model, x: torch.Tensor, forward=None, step: int = 3) -> torch.Tensor:
    """Backward of the training loss at the (t, random positions) of `step` (t > 1 asserted) through `forward`
    (default: the model itself); returns the loss."""
    t, positions = scale_and_positions(model.rope, "random", CFG.train_len, seed=0, step=step)
    assert t > 1
    model.zero_grad()
    logits = (forward or model)(x[:, :-1], positions=positions, t=t)
    loss = F.cross_entropy(logits.float().reshape(-1, V), x[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach()


def loss_and_grads(model, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = training_loss(model, x)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def count_forwards(module: torch.nn.Module) -> list[int]:
    """Calls of module's forward so far (a pre-hook: torch's recompute stops early, once it has what backward needs,
    so a layer's last modules may not run again)."""
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ------------------------------------------------------------------ activation checkpointing
@pytest.mark.parametrize("source", ["decoder", "hf"])
def test_activation_checkpointing_recomputes_each_layer_with_equal_loss_and_gradients(source):
    make = (lambda: clex_decoder()) if source == "decoder" else (lambda: from_decoder(clex_decoder(), CLEX).train())
    plain, checkpointed = make(), make()
    apply_activation_checkpointing(checkpointed, "auto")
    x = batch()

    def first_norms(model):  # each layer's first module (HF checkpoints a layer's forward, inside its own hooks)
        return [b.attn_norm for b in model.blocks] if source == "decoder" else [
            layer.input_layernorm for layer in model.hf.model.layers]

    counts, counts_ckpt = [count_forwards(m) for m in first_norms(plain)], [count_forwards(m) for m in first_norms(checkpointed)]
    (loss, grads), (loss_c, grads_c) = loss_and_grads(plain, x), loss_and_grads(checkpointed, x)
    assert [c[0] for c in counts] == [1, 1] and [c[0] for c in counts_ckpt] == [2, 2]  # forward + recompute
    assert torch.equal(loss, loss_c)
    assert grads.keys() == grads_c.keys() and any(n.startswith("rope.") for n in grads)
    assert all(torch.equal(grads[n], grads_c[n]) for n in grads), [n for n in grads if not torch.equal(grads[n], grads_c[n])]
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
        layers = [f"blocks.{i}" for i in range(n)] if isinstance(model, Decoder) else [f"hf.model.layers.{i}" for i in range(n)]
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
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        model = clex_decoder()
        mixed = FSDPPrecision(precision).mixed_precision_config if precision != "32-true" else None
        wrapped = FSDP(model, auto_wrap_policy=wrap_policy(model), sharding_strategy=ShardingStrategy.FULL_SHARD,
                       mixed_precision=mixed, use_orig_params=True, device_id=torch.device("cpu"))
        seen = []  # the dtypes of the encoding's parameters while it computes (inside its FSDP unit)
        model.rope.module.register_forward_pre_hook(lambda m, a: seen.extend(p.dtype for p in m.parameters()))
        x = batch(size=4)[2 * rank: 2 * rank + 2]  # each rank its half of the batch
        loss = training_loss(model, x, forward=wrapped)
        with FSDP.summon_full_params(wrapped, with_grads=True):
            grads = {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for n, p in wrapped.named_parameters()}
        theta = model.rope.inv_freq(3).detach()  # outside the forward: the NO_SHARD unit's weights are whole
        results[precision] = dict(loss=loss, grads=grads, seen=seen, theta=theta)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_fsdp_on_cpu_matches_one_process_and_keeps_the_encoding_fp32(tmp_path):
    """torch's FSDP with our wrap policy, 2 gloo processes on CPU, one training step of a tiny Decoder with CLEX:
    losses and averaged gradients equal the single-process ones (32-true); under Lightning's bf16 policy the
    encoding still computes with float32 weights, and θ(t) read outside the forward is the unwrapped model's."""
    mp.spawn(_fsdp_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    reference = clex_decoder()
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
