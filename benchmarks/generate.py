"""Decoding speed of CLEX against plain RoPE at 16×L, with the KV cache of `clex generate`.

Both models have params.yaml's model shape and are in eval mode, so CLEX reads θ(t) from its frequency table
(filled before timing, docs/method.md §3.6); random weights unless --checkpoint (a model.pt of this study: plain
RoPE gets its non-rope weights). CLEX is experiments/clex.yaml's continuous spec. Each generation prefills a
prompt of 15·L tokens in chunks of L (not timed), then decodes L tokens greedily, one forward per token, so
the context reaches 16·L; CLEX's first step crosses 15·L and re-rotates its whole cache once (t 15 -> 16).
Timing is round-robin in one process, batch 1: in each round both models decode, taking turns step by step
(who goes first alternates), so both see the same machine load; tokens/s is the median over rounds, the
ratio CLEX/plain the median of the per-round ratios. Goal: ratio >= 0.98 (the paper: 27.8 vs 28.3 tok/s
for CLEX-7B vs LLaMA-2-7B). On a shared CPU, OMP_NUM_THREADS=1 gives steadier numbers.

    ./run python benchmarks/generate.py [--rounds 7] [--device cpu] [--checkpoint PATH]
                                        [--json build/benchmarks/generate.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from clex.config import load_study
from clex.generate import decode_steps, prefill
from clex.model import Decoder
from clex.rope import build_position_encoding
from clex.train import PLAIN


def model_for(study, name: str, checkpoint: Path | None, device: str) -> Decoder:
    exp = PLAIN if name == "plain" else study.experiment(name)
    m = study.params.model
    torch.manual_seed(0)
    rope = build_position_encoding(exp.rope, head_dim=m.head_dim, base=m.rope_base, train_len=m.train_len)
    model = Decoder(m, study.params.data.vocab_size, rope)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    model = model.to(device).eval()
    model.rope.frequency_table()  # fill the inference cache before anything is timed
    return model


def timed_step(steps, device: str) -> tuple[float, float]:
    """(seconds, t) of one decoding step: one forward through the cache and the pick of the next token."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    _, t = next(steps)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, t


def one_round(models: dict, prompt: torch.Tensor, n: int, device: str) -> tuple[dict, dict]:
    """Every model prefills `prompt` (not timed), then decodes n tokens, the models taking turns step by step
    (so both see the same machine load): decoding seconds per model, and the t of each of its forwards."""
    steps = {name: decode_steps(model, *prefill(model, prompt)) for name, model in models.items()}
    for it in steps.values():
        next(it)  # the first token is picked from the prefill's logits: no forward
    seconds, ts = dict.fromkeys(models, 0.0), {name: [] for name in models}
    order = list(steps)
    for i in range(n):
        for name in order if i % 2 else order[::-1]:  # alternate who goes first: no bias from the order
            dt, t = timed_step(steps[name], device)
            seconds[name] += dt
            ts[name].append(t)
    return seconds, ts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".")
    ap.add_argument("--experiment", default="clex", help="the CLEX experiment (default: experiments/clex.yaml)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--checkpoint", type=Path, help="model.pt to load into both models (default: random weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=Path("build/benchmarks/generate.json"))
    args = ap.parse_args()
    study = load_study(args.root)
    L = study.params.model.train_len
    names = ["plain", args.experiment]
    models = {name: model_for(study, name, args.checkpoint, args.device) for name in names}
    prompt = torch.randint(0, study.params.data.vocab_size, (15 * L,), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in names}
    for i in range(args.rounds + 1):
        seconds, ts = one_round(models, prompt, L, args.device)
        if i:  # the first round is warm-up
            for name in names:
                times[name].append(seconds[name])
    tps = {name: L / statistics.median(times[name]) for name in names}
    ratio = statistics.median(p / c for p, c in zip(times["plain"], times[args.experiment]))
    clex_t = ts[args.experiment]
    print(f"{args.device}, batch 1, {torch.get_num_threads()} threads: {L} tokens decoded after a {15 * L}-token "
          f"prompt (context {15 * L + 1}..{16 * L}), {args.rounds} rounds; "
          f"{args.experiment}'s t {clex_t[0]}..{clex_t[-1]}")
    for name in names:
        print(f"{name:12s}{tps[name]:10.1f} tokens/s")
    print(f"ratio {args.experiment}/plain: {ratio:.3f} (goal >= 0.98; paper 27.8/28.3 = {27.8 / 28.3:.3f})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "device": args.device, "threads": torch.get_num_threads(), "train_len": L, "prompt_tokens": 15 * L,
        "decoded_tokens": L, "rounds": args.rounds, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "tokens_per_s": tps, "ratio": ratio, "seconds": times, "t": ts}, indent=2))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
