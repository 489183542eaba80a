"""What the multi-process tests of tests/test_distributed.py run in their spawned processes, kept apart so that each
process imports only torch, Lightning and the model (not transformers or MLflow): a tiny Decoder with CLEX, its
training loss, the FSDP worker and the callback that records each rank's draws."""
from __future__ import annotations

import os
import socket

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import FSDPPrecision
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy

from clex.config import ModelConfig
from clex.distributed import wrap_policy
from clex.lit import scale_and_positions
from clex.model import Decoder
from clex.rope import ClexSpec, build_position_encoding

V = 50
CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, train_len=16)  # head dim 16
CLEX = ClexSpec(type="clex", t_max=4)


def clex_decoder(seed: int = 0) -> Decoder:
    """A tiny Decoder with CLEX whose ODE weights are random (θ(t) really depends on them)."""
    torch.manual_seed(seed)
    rope = build_position_encoding(CLEX, head_dim=CFG.head_dim, base=CFG.rope_base, train_len=CFG.train_len)
    model = Decoder(CFG, V, rope)
    with torch.no_grad():  # non-zero ODE weights (test_rope.randomise, without importing transformers)
        gen = torch.Generator().manual_seed(seed)
        for p in rope.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clex_model(source: str):
    """`clex_decoder()`, or the same weights in an HFDecoder (a LlamaForCausalLM; transformers imported only here)."""
    if source == "decoder":
        return clex_decoder()
    from clex.hf import from_decoder

    return from_decoder(clex_decoder(), CLEX).train()


def fsdp_worker(rank: int, port: int, out: str, source: str = "decoder") -> None:
    """One training forward/backward of `clex_model(source)` under torch FSDP with our wrap policy, on this rank's
    half of the batch, in 32-true and under Lightning's bf16-mixed FSDP policy; saves what the test compares."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        model = clex_model(source)
        mixed = FSDPPrecision(precision).mixed_precision_config if precision != "32-true" else None
        wrapped = FSDP(model, auto_wrap_policy=wrap_policy(model), sharding_strategy=ShardingStrategy.FULL_SHARD,
                       mixed_precision=mixed, use_orig_params=True, device_id=torch.device("cpu"))
        seen = []  # the dtypes of the encoding's parameters while it computes (inside its FSDP unit)
        encoding = getattr(model.rope, "module", model.rope)  # inside Decoder.rope's FSDP wrapper
        encoding.register_forward_pre_hook(lambda m, a: seen.extend(p.dtype for p in m.parameters()))
        x = batch(size=4)[2 * rank: 2 * rank + 2]  # each rank its half of the batch
        loss = training_loss(model, x, forward=wrapped)
        with FSDP.summon_full_params(wrapped, with_grads=True):
            grads = {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for n, p in wrapped.named_parameters()}
        theta = model.rope.inv_freq(3).detach()  # outside the forward: the NO_SHARD unit's weights are whole
        results[precision] = dict(loss=loss, grads=grads, seen=seen, theta=theta)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


class DrawRecorder(L.Callback):
    """Writes each rank's (step, micro-batch, t, positions) draws and its final parameters to `out`/rank<r>.pt."""

    def __init__(self, out: str):
        self.out, self.draws = out, []

    def on_train_batch_start(self, trainer, lit, batch, batch_idx):
        micro = batch_idx % lit.optim.accumulate
        self.draws.append((trainer.global_step, micro, *lit.scale_and_positions(batch.shape[1] - 1, micro)))

    def on_train_end(self, trainer, lit):
        state = {k: v.detach().clone() for k, v in lit.model.state_dict().items()}
        torch.save({"draws": self.draws, "state": state}, f"{self.out}/rank{trainer.global_rank}.pt")
