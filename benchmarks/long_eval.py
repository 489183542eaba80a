"""Memory of the progressive protocol at long lengths, against the former scoring in the same process scheme.

For lengths L·2^k up to --max-len, batch 1, random tokens, it runs
- new: the real protocol, `clex.evaluate.perplexity(..., "progressive")`: each chunk scored as it comes (one
  chunk's logits at a time), a cache sized for the window and written in place, chunk attention through
  `causal_lower_right`;
- old: the former scoring, every logit of the window at once (B, n, V) through a cache grown as needed, one
  cross-entropy over them, chunk attention with an explicit (T, n) mask;
and records the peak memory, the wall time and tokens/s per length, stopping at the first length that does not fit
(out of memory). Peak memory: on CUDA `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, in this
process; on the CPU the peak resident set (Linux VmHWM, reset just before the evaluation) of a fresh subprocess per
length and path, run under an address-space limit (--cpu-mem-limit-gb) so that "does not fit" is an allocation
error, not the machine's OOM killer, and with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB, so that freed tensors
leave the resident set (by default the per-chunk masks, a little larger at every chunk, fragment the heap and the
peak RSS measures that rather than what is held: docs/protocols.md, "Memory"). `eval MiB` is the peak above what the process held before the evaluation (the
model and the tokens); the ratio new/old is taken on it.

    python benchmarks/long_eval.py --device cuda --hf-shape tinyllama --encoding clex --dtype bf16 \\
        --max-len 65536 --out build/benchmarks/long_eval.json
    nice -n 19 python benchmarks/long_eval.py --device cpu --d-model 64 --layers 2 --heads 4 --d-ff 192 \\
        --vocab 4096 --train-len 512 --max-len 65536

Models: `--model decoder` (ours, shape flags), `--hf PATH` (a local HF checkpoint: one saved by
`HFDecoder.save_pretrained`, or a plain LLaMA-family folder with --encoding), `--hf-shape tinyllama` (a random-init
1.1B LlamaConfig, built directly on the device in --dtype; nothing is downloaded).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import TypeAdapter

import clex.attention
from clex.config import EvalConfig, ModelConfig, PositionSpec
from clex.evaluate import perplexity, progressive_logits
from clex.model import Decoder, parameter_count
from clex.rope import build_position_encoding
from inference import _rss_kib

TINYLLAMA = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(args) -> torch.nn.Module:
    """The model the flags name, in eval mode on --device; HF bodies in --dtype, our Decoder float32 (bf16: autocast)."""
    spec = TypeAdapter(PositionSpec).validate_python({"type": args.encoding})
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    torch.manual_seed(0)
    if args.hf_shape or args.hf:
        from transformers import AutoModelForCausalLM, LlamaConfig

        from clex.hf import HFDecoder, load_hf_model

        if args.hf and (Path(args.hf) / "clex_rope.json").is_file():
            return load_hf_model(args.hf, dtype=dtype).to(device).eval()
        if args.hf:
            hf = AutoModelForCausalLM.from_pretrained(args.hf, dtype=dtype, attn_implementation="sdpa")
        else:
            config = LlamaConfig(**TINYLLAMA, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                 attn_implementation="sdpa")
            with device:  # initialised where it runs, in its dtype
                hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return HFDecoder(hf, spec, args.train_len or 2048).to(device).eval()
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, d_ff=args.d_ff,
                      train_len=args.train_len or 512)
    rope = build_position_encoding(spec, head_dim=cfg.head_dim, base=cfg.rope_base, train_len=cfg.train_len)
    return Decoder(cfg, args.vocab, rope).to(device).eval()


@contextmanager
def explicit_mask(device: torch.device):
    """The former attention of a chunk against the cache: an explicit (T, n) boolean mask."""
    real = clex.attention.causal_lower_right
    clex.attention.causal_lower_right = lambda Tq, Tk: ~clex.attention.future(Tq, Tk, device)
    try:
        yield
    finally:
        clex.attention.causal_lower_right = real


@torch.inference_mode()
def score(model, x: torch.Tensor, path: str, dtype: str) -> float:
    """Summed NLL of (1, n) tokens by the new path (the protocol) or the old one (all logits at once)."""
    autocast = torch.autocast(x.device.type, torch.bfloat16) if dtype == "bf16" and isinstance(model, Decoder) else nullcontext()
    with autocast:
        if path == "new":
            n = x.shape[1]
            return perplexity(model, x, n, EvalConfig(lengths=[n], batch_size=1), "progressive")["nll"]
        with explicit_mask(x.device):
            logits = progressive_logits(model, x, cache=model.new_cache())
            losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none")
        return losses.double().sum().item()


def measure(model, vocab: int, n: int, path: str, args) -> dict:
    """One evaluation of n random tokens: peak memory (total and above the state before), seconds, tokens/s, NLL;
    or {"oom": message}."""
    x = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    start = time.perf_counter()
    try:
        nll = score(model, x, path, args.dtype)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "memory" not in str(e).lower():
            raise
        return {"oom": str(e).splitlines()[0][:200]}
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    return {"peak_mib": peak / 2**20, "eval_mib": (peak - before) / 2**20, "seconds": seconds,
            "tokens_per_s": n / seconds, "nll": nll}


def child(args, n: int, path: str) -> dict:
    """`measure` in a fresh process (CPU peak RSS), under the address-space limit; a failed child reads as OOM."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", f"{path}:{n}"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}  # glibc: freed blocks >= 1 MiB go back to the system
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"oom": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["decoder"], default="decoder", help="ours (the default), unless --hf/--hf-shape")
    ap.add_argument("--hf", help="a local HF checkpoint folder")
    ap.add_argument("--hf-shape", choices=["tinyllama"], help="a random-init HF model of this shape (no download)")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=192)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--train-len", type=int, help="L, the chunk size (default 512 for ours, 2048 for HF)")
    ap.add_argument("--encoding", default="clex", help="a registered position encoding with default settings")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-len", type=int, default=65536)
    ap.add_argument("--paths", nargs="+", choices=["new", "old"], default=["new", "old"])
    ap.add_argument("--cpu-mem-limit-gb", type=float, default=6.0, help="address-space limit of each CPU child")
    ap.add_argument("--out", type=Path, default=Path("build/benchmarks/long_eval.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)  # path:length, one CPU measurement in a fresh process
    args = ap.parse_args()
    if args.child:
        import resource

        limit = int(args.cpu_mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        path, n = args.child.split(":")
        model = build_model(args)
        print(json.dumps(measure(model, model.vocab_size, int(n), path, args)))
        return
    cuda = args.device.startswith("cuda")
    model = build_model(args) if cuda else None
    probe = model if model is not None else build_model(args)
    L, vocab, params = probe.cfg.train_len, probe.vocab_size, parameter_count(probe)
    del probe
    lengths = [L * 2**k for k in range(64) if L * 2**k <= args.max_len]
    results, fits = {}, {path: None for path in args.paths}
    live = list(args.paths)
    print(f"{args.device} {args.dtype}, {args.hf_shape or args.hf or 'decoder'} ({params / 1e6:.1f}M parameters), "
          f"{args.encoding}, L = {L}, batch 1")
    print(f"{'length':>8s}" + "".join(f"{p + ' MiB':>12s}{p + ' eval':>12s}{p + ' tok/s':>12s}" for p in args.paths)
          + f"{'new/old':>9s}")
    for n in lengths:
        row = {}
        for path in live:
            row[path] = measure(model, vocab, n, path, args) if cuda else child(args, n, path)
            if "oom" not in row[path]:
                fits[path] = n
        live = [p for p in live if "oom" not in row[p]]
        if {"new", "old"} <= row.keys() and "oom" not in row["new"] and "oom" not in row["old"]:
            row["ratio_eval_mib_new_over_old"] = row["new"]["eval_mib"] / row["old"]["eval_mib"]
            row["ratio_peak_mib_new_over_old"] = row["new"]["peak_mib"] / row["old"]["peak_mib"]
            row["nll_abs_diff"] = abs(row["new"]["nll"] - row["old"]["nll"])
        results[n] = row
        cells = ""
        for p in args.paths:
            r = row.get(p, {"oom": "not run"})
            cells += (f"{'OOM':>36s}" if "oom" in r else
                      f"{r['peak_mib']:>12.1f}{r['eval_mib']:>12.1f}{r['tokens_per_s']:>12.0f}")
        ratio = row.get("ratio_eval_mib_new_over_old")
        print(f"{n:>8d}{cells}{'' if ratio is None else f'{ratio:>9.3f}'}", flush=True)
        if "new" in args.paths and "new" not in live:
            break
    print("longest length that fits: " + ", ".join(f"{p} {fits[p]}" for p in args.paths))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": args.device, "dtype": args.dtype, "model": args.hf_shape or args.hf or "decoder",
        "shape": None if (args.hf or args.hf_shape) else {"d_model": args.d_model, "layers": args.layers,
                                                          "heads": args.heads, "d_ff": args.d_ff, "vocab": args.vocab},
        "parameters": params, "encoding": args.encoding, "train_len": L, "batch": 1, "lengths": results,
        "longest_fit": fits}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
