"""Training-step cost of each position encoding, as a ratio to plain RoPE measured in the same process.

A step is what LitDecoder does: draw t and positions, forward, cross-entropy, backward, AdamW step.
Model and batch come from params.yaml (or --params); the experiments from experiments/*.yaml.

    ./run python benchmarks/step_time.py                      # every experiment in params.yaml
    ./run python benchmarks/step_time.py --steps 30 --experiments naive_ft clex
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clex.config import load_study
from clex.lit import scale_and_positions
from clex.model import Decoder
from clex.rope import build_position_encoding


class Stepper:
    """One model with its optimiser and a fixed batch; `step()` times one training step."""

    def __init__(self, study, experiment, vocab: int):
        m, ft = study.params.model, study.params.finetune
        torch.manual_seed(0)
        self.rope = build_position_encoding(experiment.rope, head_dim=m.head_dim, base=m.rope_base, train_len=m.train_len)
        self.model, self.vocab = Decoder(m, vocab, self.rope), vocab
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.seq_len, self.sampling, self.n = ft.seq_len_factor * m.train_len, experiment.position_sampling, 0
        self.batch = torch.randint(0, vocab, (ft.batch_size, self.seq_len + 1), generator=torch.Generator().manual_seed(0))

    def step(self) -> float:
        start = time.perf_counter()
        t, positions = scale_and_positions(self.rope, self.sampling, self.seq_len, 0, self.n)  # as in training
        logits = self.model(self.batch[:, :-1], positions=positions, t=t)
        loss = F.cross_entropy(logits.reshape(-1, self.vocab), self.batch[:, 1:].reshape(-1))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.n += 1
        return time.perf_counter() - start


def step_times(steppers: dict[str, Stepper], steps: int, warmup: int = 3) -> dict[str, list[float]]:
    """Round-robin: one step of each model per round, so drift in machine speed hits all of them alike."""
    times = {name: [] for name in steppers}
    for i in range(warmup + steps):
        for name, s in steppers.items():
            dt = s.step()
            if i >= warmup:
                times[name].append(dt)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--experiments", nargs="*")
    ap.add_argument("--json", type=Path, default=Path("build/benchmarks/step_time.json"))
    args = ap.parse_args()
    study = load_study(args.root)
    names = args.experiments or study.params.experiments
    m, ft = study.params.model, study.params.finetune
    print(f"model d{m.d_model} x {m.n_layers} layers, batch {ft.batch_size} x {ft.seq_len_factor * m.train_len} tokens, "
          f"{torch.get_num_threads()} threads, {args.steps} timed steps each")
    from clex.train import PLAIN

    steppers = {"plain RoPE (baseline)": Stepper(study, PLAIN, args.vocab)}
    steppers.update({name: Stepper(study, study.experiment(name), args.vocab) for name in names})
    times = step_times(steppers, args.steps)
    baseline = statistics.median(times["plain RoPE (baseline)"])
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"ms_per_step": 1000 * med, "ratio_to_plain": med / baseline}
        print(f"{name:28s} {1000 * med:8.1f} ms/step  {med / baseline:.3f}x  (min {1000 * min(ts):.1f}, "
              f"max {1000 * max(ts):.1f})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "steps": args.steps, "rows": rows}, indent=2))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
