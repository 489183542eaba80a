"""GPU check, parts (a) and (b) (run by benchmarks/gpu_check.sh): a ~100M-parameter decoder at 4k tokens in bf16.

(a) Training tokens/s of plain RoPE and CLEX (continuous, configured solver; t ~ U{1..t_max} and random
positions as in training), timed round-robin in one process (one step of each in turn, so drift in clock speed
hits both alike), their ratio against the goal CLEX >= 0.95 x plain, model FLOPs utilisation (6·N + 12·layers·d·T
FLOPs per token, clex.profile.train_flops_per_token, against the dense bf16 peak --peak-tflops), and the longest
length whose single forward fits in memory for each.
(b) Attention kernels on the same shapes (B, heads, T, head dim), forward + backward: SDPA forced to its flash
backend, SDPA's own choice, and flash-attn when installed (each with the reason when it cannot run).

`--smoke` runs tiny shapes on CPU in seconds (tests/test_benchmarks.py): the JSON has the same fields; its timings
mean nothing. Writes JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clex import attention as attention_module
from clex.config import ClexSpec, ModelConfig, RopeSpec
from clex.lit import scale_and_positions
from clex.model import Decoder, parameter_count
from clex.profile import train_flops_per_token
from clex.rope import build_position_encoding

GOAL = 0.95  # CLEX training tokens/s at least this share of plain RoPE's
SHAPES = {  # ~110M parameters with a 32k vocab, L = 4096 (the paper's training length)
    "full": dict(cfg=ModelConfig(d_model=768, n_layers=12, n_heads=12, d_ff=2048, train_len=4096), vocab=32000,
                 batch=4, steps=15, max_eval_len=4096 * 32),
    "smoke": dict(cfg=ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=128, train_len=64), vocab=512,
                  batch=2, steps=2, max_eval_len=256),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(spec, cfg: ModelConfig, vocab: int, device: str) -> Decoder:
    torch.manual_seed(0)
    rope = build_position_encoding(spec, head_dim=cfg.head_dim, base=cfg.rope_base, train_len=cfg.train_len)
    return Decoder(cfg, vocab, rope).to(device)


def train_step(model, opt, x, sampling: str, step: int, dtype) -> None:
    cfg = model.cfg
    t, positions = scale_and_positions(model.rope, sampling, cfg.train_len, 0, step)
    positions = None if positions is None else positions.to(x.device)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(x[:, :-1], positions=positions, t=t)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def throughput(models: dict, shape: dict, device: str, dtype, warmup: int = 3) -> dict[str, float]:
    """Training tokens/s of each model (name -> (model, sampling)), one step of each in turn."""
    cfg, batch = shape["cfg"], shape["batch"]
    x = torch.randint(0, shape["vocab"], (batch, cfg.train_len + 1), device=device)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device == "cuda") for n, (m, _) in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    for step in range(warmup + shape["steps"]):
        for name, (model, sampling) in models.items():
            sync(device)
            start = time.perf_counter()
            train_step(model, opts[name], x, sampling, step, dtype)
            sync(device)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {n: batch * cfg.train_len / statistics.median(ts) for n, ts in times.items()}


@torch.no_grad()
def longest_forward(model: Decoder, vocab: int, limit: int, device: str, dtype) -> int:
    """The longest power-of-two multiple of L (up to `limit`) whose single forward fits in memory."""
    model.eval()
    fits, n = 0, model.cfg.train_len
    while n <= limit:
        try:
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                model(torch.randint(0, vocab, (1, n), device=device))
            sync(device)
            fits, n = n, 2 * n
        except torch.OutOfMemoryError:
            break
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    model.train()
    return fits


def attention_kernels(shape: dict, device: str, dtype, steps: int) -> dict:
    """Forward + backward ms of causal attention at (batch, heads, T, head dim) per kernel, or why it cannot run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = shape["cfg"]
    q, k, v = (torch.randn(shape["batch"], cfg.n_heads, cfg.train_len, cfg.head_dim, device=device, dtype=dtype,
                           requires_grad=True) for _ in range(3))

    def sdpa_flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    kernels = {"sdpa_flash": sdpa_flash, "sdpa_default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    if attention_module.flash_attn_func is not None:
        kernels["flash_attn"] = lambda: attention_module.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    out: dict = {"shape": [shape["batch"], cfg.n_heads, cfg.train_len, cfg.head_dim], "dtype": str(dtype),
                 "flash_attn_installed": attention_module.flash_attn_func is not None}
    for name, fn in kernels.items():
        try:
            times = []
            for i in range(steps + 2):
                sync(device)
                start = time.perf_counter()
                fn().sum().backward()
                sync(device)
                if i >= 2:
                    times.append(time.perf_counter() - start)
            out[name] = {"fwd_bwd_ms": 1e3 * statistics.median(times)}
        except RuntimeError as e:  # e.g. no flash kernel for this device or dtype
            out[name] = {"error": str(e).splitlines()[0][:200]}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in fp32 (tests); timings mean nothing")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 (fp32 with --smoke)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--max-eval-len", type=int)
    ap.add_argument("--json", type=Path, default=Path("build/benchmarks/gpu_throughput.json"))
    args = ap.parse_args(argv)
    shape = dict(SHAPES["smoke" if args.smoke else "full"])
    shape.update({k: getattr(args, k) for k in ("batch", "steps") if getattr(args, k)})
    device = args.device or ("cpu" if args.smoke else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("fp32" if args.smoke else "bf16")]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_throughput: needs a CUDA GPU (or --smoke / --device cpu)")
    cfg = shape["cfg"]
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "cuda": torch.version.cuda, "dtype": str(dtype), "smoke": args.smoke,
              "shape": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_ff": cfg.d_ff,
                        "seq_len": cfg.train_len, "vocab": shape["vocab"], "batch": shape["batch"],
                        "steps": shape["steps"]}}
    models = {"plain": (build(RopeSpec(type="rope"), cfg, shape["vocab"], device), "none"),
              "clex": (build(ClexSpec(type="clex", t_max=16), cfg, shape["vocab"], device), "random")}
    tps = throughput(models, shape, device, dtype)
    for name, (model, _) in models.items():
        n = parameter_count(model)
        report[name] = {"params": n, "train_tokens_per_s": tps[name],
                        "mfu": tps[name] * train_flops_per_token(cfg, shape["vocab"], cfg.train_len)
                        / (args.peak_tflops * 1e12),
                        "longest_forward_fits": longest_forward(model, shape["vocab"],
                                                                args.max_eval_len or shape["max_eval_len"], device, dtype)}
    ratio = tps["clex"] / tps["plain"]
    report["clex_over_plain_tokens_per_s"] = {"ratio": ratio, "goal": GOAL, "pass": ratio >= GOAL}
    del models, model  # free the GPU for the kernels' timing
    report["attention"] = attention_kernels(shape, device, dtype, shape["steps"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"CLEX / plain training tokens/s: {ratio:.3f} (goal >= {GOAL}): {'PASS' if ratio >= GOAL else 'FAIL'}")
    return report


if __name__ == "__main__":
    main()
