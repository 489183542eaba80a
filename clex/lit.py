"""The LightningModule: one t per micro-batch, training positions, loss, optimiser, logging; and the
callback that logs how far the learned frequency basis has moved.

t and the positions are drawn from a generator seeded by (seed, global step, micro-batch), so every DDP
rank draws the same t without communication (docs/method.md §3.4 leaves this open; we decide it explicitly).
With gradient accumulation each micro-batch draws its own t, as the official code draws one per forward.
"""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from clex.config import OptimConfig, ParamsError
from clex.model import Decoder
from clex.rope import effective_step_scale, sample_scale, training_positions


MICRO_STRIDE = 0x9E3779B1  # 2^32 / golden ratio: micro-batch m's seed lies far from every other step's


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, micro-batch): identical on every rank and on a
    resumed run; micro-batch 0 draws what one batch per step always drew. (torch's CPU generator keeps
    only the low 32 bits of a seed, hence an odd 32-bit stride per micro-batch rather than a bit shift.)"""
    return torch.Generator().manual_seed(1_000_003 * seed + step + micro * MICRO_STRIDE)


def lr_lambda(optim: OptimConfig):
    """Linear warm-up to lr, then cosine decay to min_lr_ratio·lr at the last step."""

    def f(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = min(1.0, (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def scale_and_positions(rope, position_sampling: str, seq_len: int, seed: int, step: int, micro: int = 0):
    """(t, CPU positions or None) for one micro-batch of a training step, from its (seed, step, micro) generator.

    Encodings with a scale draw t ~ U{1..t_max} and the positions of `position_sampling`; the others
    get t = 1 and whatever their `sample_positions` draws (None, i.e. 0..N-1, for most).
    """
    gen = step_generator(seed, step, micro)
    if rope.t_max is None:
        return 1, rope.sample_positions(seq_len, gen)
    t = sample_scale(rope.t_max, gen)
    return t, training_positions(position_sampling, seq_len, t, rope.train_len, gen)


def learns_basis(rope) -> bool:
    """Whether the encoding learns its frequencies θ(t) (CLEX, continuous or discrete): parameters and a scale t."""
    return rope.t_max is not None and any(True for _ in rope.parameters())


def resolve_rope_lr(optim: OptimConfig, rope) -> tuple[float, float | None]:
    """(learning rate of the encoding's parameters, S): `rope_lr` if set, else `rope_step` / S, else `lr`.
    S = `effective_step_scale` at t_max, computed (None otherwise) for encodings that learn their basis."""
    learned = learns_basis(rope)
    scale = effective_step_scale(rope) if learned else None
    rope_lr, rope_step = getattr(optim, "rope_lr", None), getattr(optim, "rope_step", None)
    if rope_lr is not None:
        return rope_lr, scale
    if rope_step is not None and scale:
        return rope_step / scale, scale
    if rope_step is not None and learned:
        raise ParamsError(f"finetune.rope_step: {rope_step}, but z(t_max) does not depend on the encoding's "
                          f"parameters (S = 0 at t_max = {rope.t_max}); allowed: finetune.rope_lr instead")
    return optim.lr, scale


class LitDecoder(L.LightningModule):
    """Trains a Decoder; `position_sampling` decides the training positions for the sampled t.

    AdamW (optim.betas) over three parameter groups: the body's matrices (optim.weight_decay), the body's
    other parameters (norms; no decay) and the position encoding's (lr `rope_lr`, default optim.lr; no decay,
    as officially). rope_lr 0 freezes the encoding instead (requires_grad False, no group). Micro-batch
    `batch_idx % optim.accumulate` of an update draws its own t and positions.
    """

    def __init__(self, model: Decoder, optim: OptimConfig, seed: int, position_sampling: str = "none",
                 val_protocol: str | None = None, rope_lr: float | None = None):
        super().__init__()
        self.model, self.optim, self.seed, self.position_sampling = model, optim, seed, position_sampling
        self.rope_lr = optim.lr if rope_lr is None else rope_lr
        if self.rope_lr == 0:
            model.rope.requires_grad_(False)
        self.tokens_seen = 0
        # val_protocol (the sweep): one validation loader per length, each window run as that evaluation protocol
        # runs it (docs/protocols.md); logs val_ppl_<n> and their mean val_ppl. None: val_loss at the training length
        self.val_protocol, self._val_nll = val_protocol, {}
        self.restored_metrics: dict[str, float] = {}  # the checkpoint's, when resumed (`final_metrics`)
        # the matrices, by name, read before any wrapping: FSDP (use_orig_params) turns sharded parameters into 1-D views
        self._matrices = {name for name, p in model.named_parameters() if p.ndim == 2}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["callback_metrics"] = {k: float(v) for k, v in self.trainer.callback_metrics.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.restored_metrics = checkpoint.get("callback_metrics", {})

    def final_metrics(self) -> dict[str, float]:
        """The last value of every metric logged through Lightning, as an uninterrupted run ends with them: a
        resumed run's own, over those its checkpoint held (e.g. a val_loss of a validation before the resume)."""
        return {**self.restored_metrics, **{k: float(v) for k, v in self.trainer.callback_metrics.items()}}

    def scale_and_positions(self, seq_len: int, micro: int = 0) -> tuple[int, torch.Tensor | None]:
        """(t, positions on this device) for micro-batch `micro` of this step; see `scale_and_positions`."""
        t, positions = scale_and_positions(self.model.rope, self.position_sampling, seq_len, self.seed,
                                           self.global_step, micro)
        return t, None if positions is None else positions.to(self.device)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        t, positions = self.scale_and_positions(x.shape[1], micro=batch_idx % self.optim.accumulate)
        logits = self.model(x, positions=positions, t=t)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        if not torch.isfinite(loss):  # CLEX issues #3/#11: stop clearly rather than train on NaNs
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {self.global_step} (t={t})")
        self.tokens_seen += x.numel() * self.trainer.world_size
        self.log_dict(
            {"train_loss": loss, "lr": self.optimizers().param_groups[0]["lr"], "t": float(t)},
            on_step=True, prog_bar=True, rank_zero_only=True,
        )
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch[:, :-1], batch[:, 1:]
        if self.val_protocol is None:  # the training length: one chunk, the same under every protocol
            logits = self.model(x)
        else:
            from clex.evaluate import forward_of  # only a sweep trial's validation runs evaluation code

            logits = forward_of(self.model, self.val_protocol)(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        if self.val_protocol is None:
            self.log("val_loss", loss, on_epoch=True, sync_dist=True)
            return
        nll, count = self._val_nll.get(x.shape[1], (0.0, 0))
        self._val_nll[x.shape[1]] = (nll + loss.item() * y.numel(), count + y.numel())

    def on_validation_epoch_end(self) -> None:
        """PPL per validation length (token-weighted) and `val_ppl`, their mean: the sweep's objective."""
        if self.val_protocol is None:
            return
        if self.trainer.world_size > 1:
            raise RuntimeError("per-length validation runs in one process (the sweep trains one process per trial)")
        ppl = {f"val_ppl_{n}": math.exp(nll / count) for n, (nll, count) in sorted(self._val_nll.items())}
        self._val_nll = {}
        ppl["val_ppl"] = sum(ppl.values()) / len(ppl)
        self.log_dict(ppl, logger=False)  # for callbacks (pruning) ...
        if self.logger is not None:  # ... and logged at the optimizer steps taken, the step Optuna's reports use
            self.logger.log_metrics(ppl, step=self.global_step)

    def param_groups(self) -> list[dict]:
        """AdamW groups: body_decay, body_no_decay (norms), rope (lr rope_lr, no decay; absent when frozen)."""
        decay, no_decay, rope = [], [], []
        for name, p in self.model.named_parameters():
            name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            (rope if name.startswith("rope.") else decay if name in self._matrices else no_decay).append(p)
        groups = [{"name": "body_decay", "params": decay, "weight_decay": self.optim.weight_decay},
                  {"name": "body_no_decay", "params": no_decay, "weight_decay": 0.0}]
        if rope and self.rope_lr > 0:
            groups.append({"name": "rope", "params": rope, "weight_decay": 0.0, "lr": self.rope_lr})
        return groups

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Under FSDP the norm is the whole model's, over every rank's shard: the wrapped root's `clip_grad_norm_`
        (Lightning's FSDP precision refuses to clip by norm); elsewhere Lightning's clipping."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if gradient_clip_val and isinstance(self.trainer.model, FSDP):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.param_groups(), lr=self.optim.lr, betas=tuple(self.optim.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.optim))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def monitor_scales(t_max: int) -> list[int]:
    """t = 2, 4, 8, ... up to t_max, and t_max."""
    return sorted({2 ** k for k in range(1, t_max.bit_length()) if 2 ** k <= t_max} | {t_max})


@torch.no_grad()
def log_frequencies(rope, ts: list[int]) -> dict[int, torch.Tensor]:
    """z(t) = ln θ(t), float64 on the CPU, for t in ts (and t = 1)."""
    return {t: rope.inv_freq(t).detach().double().cpu().log() for t in sorted(set(ts) | {1})}


def basis_metrics(z: dict[int, torch.Tensor], prior: dict[int, torch.Tensor], t_max: int) -> dict[str, float]:
    """basis_max_dz_t<t> / basis_mean_dz_t<t> = max / mean over pairs of |z(t) - z_prior(t)|, and
    basis_max_ratio / basis_min_ratio = max / min over pairs of θ_i(t_max)/θ_i(1)."""
    out = {}
    for t in sorted(prior):
        if t > 1:
            dz = (z[t] - prior[t]).abs()
            out[f"basis_max_dz_t{t}"], out[f"basis_mean_dz_t{t}"] = dz.max().item(), dz.mean().item()
    ratio = (z[t_max] - z[1]).exp()
    out["basis_max_ratio"], out["basis_min_ratio"] = ratio.max().item(), ratio.min().item()
    return out


class BasisMonitor(L.Callback):
    """Logs, every `every` optimizer steps and at the last one, how far a learned encoding's ln θ(t) has
    moved from its value when the monitor was made (the prior the fine-tune starts from), so a pathological
    basis shows in the MLflow charts while it trains (`basis_metrics`). Rank 0 only, no grad; the θ(t) are
    the training-mode ones (for the ODE: a few solves with the configured solver)."""

    def __init__(self, rope, every: int):
        self.rope, self.every, self.ts = rope, every, monitor_scales(rope.t_max)
        self.prior = log_frequencies(rope, self.ts)
        self._logged = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = step % self.every == 0 or step == trainer.max_steps
        if step == self._logged or not due or not trainer.is_global_zero or trainer.logger is None:
            return
        self._logged = step
        trainer.logger.log_metrics(basis_metrics(log_frequencies(self.rope, self.ts), self.prior, self.rope.t_max),
                                   step=step)
