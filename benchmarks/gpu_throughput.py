"""GPU check (run by benchmarks/gpu_check.sh): a ~100M-parameter decoder at 4k tokens in bf16.

Reports which attention kernels run (flash-attn when installed, SDPA's flash backend), training
tokens/s of plain RoPE and CLEX (continuous, configured solver; t ~ U{1..t_max} as in training), their
ratio, model FLOPs utilisation (6·N + 12·layers·d·T FLOPs per token against the GPU's dense bf16 peak,
--peak-tflops), and the longest eval length whose forward fits in memory for each. Writes JSON.
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
from clex.rope import build_position_encoding

CFG = ModelConfig(d_model=768, n_layers=12, n_heads=12, d_ff=2048, train_len=4096)  # ~110M with a 32k vocab
VOCAB = 32000


def build(spec) -> Decoder:
    torch.manual_seed(0)
    rope = build_position_encoding(spec, head_dim=CFG.head_dim, base=CFG.rope_base, train_len=CFG.train_len)
    return Decoder(CFG, VOCAB, rope).cuda()


def train_tokens_per_s(model: Decoder, batch: int, steps: int, sampling: str) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, VOCAB, (batch, CFG.train_len + 1), device="cuda")
    times = []
    for step in range(steps + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        t, positions = scale_and_positions(model.rope, sampling, CFG.train_len, 0, step)
        positions = None if positions is None else positions.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x[:, :-1], positions=positions, t=t)
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - start)
    return batch * CFG.train_len / statistics.median(times)


@torch.no_grad()
def longest_eval_length(model: Decoder, limit: int) -> int:
    model.eval()
    fits, n = 0, CFG.train_len
    while n <= limit:
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(torch.randint(0, VOCAB, (1, n), device="cuda"))
            torch.cuda.synchronize()
            fits, n = n, 2 * n
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    model.train()
    return fits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--max-eval-len", type=int, default=4096 * 64)
    ap.add_argument("--json", type=Path, default=Path("build/benchmarks/gpu.json"))
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 12, CFG.train_len, CFG.head_dim, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if SDPA's flash kernel cannot run here
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "flash_attn_installed": attention_module.flash_attn_func is not None, "sdpa_flash_backend": True}
    specs = {"plain": (RopeSpec(type="rope"), "none"), "clex": (ClexSpec(type="clex", t_max=16), "random")}
    for name, (spec, sampling) in specs.items():
        model = build(spec)
        n_params = parameter_count(model)
        tps = train_tokens_per_s(model, args.batch, args.steps, sampling)
        flops_per_token = 6 * n_params + 12 * CFG.n_layers * CFG.d_model * CFG.train_len
        report[name] = {"params": n_params, "train_tokens_per_s": tps,
                        "mfu": tps * flops_per_token / (args.peak_tflops * 1e12),
                        "longest_eval_len_fits": longest_eval_length(model, args.max_eval_len)}
        del model
        torch.cuda.empty_cache()
    report["clex_over_plain_step_time"] = report["plain"]["train_tokens_per_s"] / report["clex"]["train_tokens_per_s"]
    print(json.dumps(report, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
