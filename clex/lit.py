"""The LightningModule: one t per step, training positions, loss, optimiser, logging.

t and the positions are drawn from a generator seeded by (seed, global step), so every DDP rank
draws the same t without communication (method.md §3.4 leaves this open; we decide it explicitly).
"""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from clex.config import OptimConfig
from clex.model import Decoder
from clex.rope import sample_scale, training_positions


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step): identical on every rank and on a resumed run."""
    return torch.Generator().manual_seed(1_000_003 * seed + step)


def lr_lambda(optim: OptimConfig):
    """Linear warm-up to lr, then cosine decay to min_lr_ratio·lr at the last step."""

    def f(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = min(1.0, (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def scale_and_positions(rope, position_sampling: str, seq_len: int, seed: int, step: int):
    """(t, CPU positions or None) for one training step, from the (seed, step) generator.

    Encodings with a scale draw t ~ U{1..t_max} and the positions of `position_sampling`; the others
    get t = 1 and whatever their `sample_positions` draws (None, i.e. 0..N-1, for most).
    """
    gen = step_generator(seed, step)
    if rope.t_max is None:
        return 1, rope.sample_positions(seq_len, gen)
    t = sample_scale(rope.t_max, gen)
    return t, training_positions(position_sampling, seq_len, t, rope.train_len, gen)


class LitDecoder(L.LightningModule):
    """Trains a Decoder; `position_sampling` decides the training positions for the sampled t."""

    def __init__(self, model: Decoder, optim: OptimConfig, seed: int, position_sampling: str = "none",
                 val_by_length: bool = False):
        super().__init__()
        self.model, self.optim, self.seed, self.position_sampling = model, optim, seed, position_sampling
        self.tokens_seen = 0
        # val_by_length (the sweep): one validation loader per length; logs val_ppl_<n> and their mean val_ppl
        self.val_by_length, self._val_nll = val_by_length, {}

    def scale_and_positions(self, seq_len: int) -> tuple[int, torch.Tensor | None]:
        """(t, positions on this device) for this step; see the module-level `scale_and_positions`."""
        t, positions = scale_and_positions(self.model.rope, self.position_sampling, seq_len, self.seed, self.global_step)
        return t, None if positions is None else positions.to(self.device)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        t, positions = self.scale_and_positions(x.shape[1])
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
        logits = self.model(x)  # inference rule: t = ceil(n / L)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        if not self.val_by_length:
            self.log("val_loss", loss, on_epoch=True, sync_dist=True)
            return
        nll, count = self._val_nll.get(x.shape[1], (0.0, 0))
        self._val_nll[x.shape[1]] = (nll + loss.item() * y.numel(), count + y.numel())

    def on_validation_epoch_end(self) -> None:
        """PPL per validation length (token-weighted) and `val_ppl`, their mean: the sweep's objective."""
        if not self.val_by_length:
            return
        if self.trainer.world_size > 1:
            raise RuntimeError("val_by_length validation runs in one process (the sweep trains one process per trial)")
        ppl = {f"val_ppl_{n}": math.exp(nll / count) for n, (nll, count) in sorted(self._val_nll.items())}
        self._val_nll = {}
        ppl["val_ppl"] = sum(ppl.values()) / len(ppl)
        self.log_dict(ppl, logger=False)  # for callbacks (pruning) ...
        if self.logger is not None:  # ... and logged at the optimizer steps taken, the step Optuna's reports use
            self.logger.log_metrics(ppl, step=self.global_step)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            # norms, and the CLEX network (official: weight decay 0), are not decayed
            (decay if p.ndim == 2 and not name.startswith("rope.") else no_decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim.lr, betas=(0.9, 0.95),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.optim))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
