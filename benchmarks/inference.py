"""Inference cost of cached CLEX against plain RoPE: tokens/s at every eval length, and peak memory at 16×L.

The models are the evaluation ones (eval mode, no grad, params.yaml's model and eval batch size); CLEX
reads θ(t) from its frequency table, filled once before timing (docs/method.md §3.6), so its per-token work
is plain RoPE's. Timing is round-robin (one forward of each model per round). Peak memory is the
process's peak resident set (Linux VmHWM, reset just before) during one forward at the longest eval
length, each in a fresh process (CPU), or torch.cuda.max_memory_allocated on CUDA.

    ./run python benchmarks/inference.py [--reps 10] [--json build/benchmarks/inference.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from clex.config import load_study
from clex.model import Decoder
from clex.rope import build_position_encoding

VOCAB = 4096


def model_for(study, name: str, device: str) -> Decoder:
    from clex.train import PLAIN

    exp = PLAIN if name == "plain" else study.experiment(name)
    m = study.params.model
    torch.manual_seed(0)
    rope = build_position_encoding(exp.rope, head_dim=m.head_dim, base=m.rope_base, train_len=m.train_len)
    model = Decoder(m, VOCAB, rope).to(device).eval()
    model.rope.frequency_table()  # fill the inference cache before anything is timed
    return model


def batch(study, n: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    return torch.randint(0, VOCAB, (study.params.eval.batch_size, n), generator=gen).to(device)


@torch.no_grad()
def throughput(study, names: list[str], reps: int, device: str) -> tuple[dict, dict]:
    """tokens/s (median over rounds) and the ratio to plain RoPE (median of per-round ratios, robust to drift)."""
    models = {name: model_for(study, name, device) for name in names}
    out, ratio = {name: {} for name in names}, {name: {} for name in names}
    for n in study.params.eval.lengths:
        x = batch(study, n, device)
        times = {name: [] for name in names}
        for i in range(reps + 1):
            for name, model in models.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(x)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first round is warm-up
                    times[name].append(time.perf_counter() - start)
        for name in names:
            out[name][n] = x.numel() / statistics.median(times[name])
            ratio[name][n] = statistics.median(p / m for p, m in zip(times["plain"], times[name]))
    return out, ratio


@torch.no_grad()
def peak_memory_mb(study, name: str, device: str) -> float:
    """Peak memory of one forward at the longest eval length, above what the process held before it."""
    model = model_for(study, name, device)
    x = batch(study, max(study.params.eval.lengths), device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(x)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    model(x)
    return (_rss_kib("VmHWM") - before) / 1024


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (peak memory on CPU needs Linux)")


def _child_peak(args, name: str) -> float:
    child = subprocess.run([sys.executable, __file__, "--root", args.root, "--device", args.device,
                            "--peak-memory-of", name], capture_output=True, text=True, check=True)
    return float(child.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".")
    ap.add_argument("--experiments", nargs="*", default=["clex", "clex_discrete"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=Path("build/benchmarks/inference.json"))
    ap.add_argument("--peak-memory-of", help=argparse.SUPPRESS)  # child mode: one measurement, fresh process
    args = ap.parse_args()
    study = load_study(args.root)
    if args.peak_memory_of:
        print(peak_memory_mb(study, args.peak_memory_of, args.device))
        return
    names = ["plain"] + args.experiments
    tps, ratios = throughput(study, names, args.reps, args.device)
    peak = {}
    for name in names:
        if args.device == "cuda":
            peak[name] = peak_memory_mb(study, name, args.device)
        else:  # the allocator makes one reading noisy: median of three fresh processes
            peak[name] = statistics.median(_child_peak(args, name) for _ in range(3))
    lengths = study.params.eval.lengths
    print(f"{args.device}, batch {study.params.eval.batch_size}, tokens/s (ratio to plain RoPE); "
          f"peak memory of one forward at {max(lengths)} tokens")
    print(f"{'':16s}" + "".join(f"{n:>18d}" for n in lengths) + f"{'peak MiB':>12s}")
    for name in names:
        cells = "".join(f"{tps[name][n]:>10.0f} ({ratios[name][n]:.3f})" for n in lengths)
        print(f"{name:16s}{cells}{peak[name]:>12.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": args.device, "tokens_per_s": tps, "ratio_to_plain": ratios,
                                     "peak_memory_mib_at_max_length": peak}, indent=2))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
