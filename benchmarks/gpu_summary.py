"""GPU check, part (e): the parts' JSON in one build/benchmarks/gpu.json and a markdown table ready to paste into
README.md (date, GPU, driver, torch), with every part that did not run named and why (its exit status: 124 is
its timeout). Run by benchmarks/gpu_check.sh after the parts; reads what exists, never fails for a missing part.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path


def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def statuses(path: Path) -> dict[str, dict]:
    """gpu_check.sh's lines 'part exit-status seconds'."""
    out = {}
    for line in (path.read_text().splitlines() if path.exists() else []):
        name, rc, seconds = line.split()
        out[name] = {"rc": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(seconds)}
    return out


def _num(x, fmt: str = ",.0f") -> str:
    return "n/a" if x is None else format(x, fmt)


def rows(s: dict) -> list[tuple[str, str]]:
    """(figure, value) rows of the markdown table."""
    out = [("date", s["date"]), ("GPU", f"{s['gpu']['name']} (driver {s['gpu']['driver']}, {s['gpu']['memory']})"),
           ("torch / CUDA", f"{s['gpu']['torch']} / {s['gpu']['cuda']}")]
    t = s.get("throughput")
    if t:
        sh = t["shape"]
        what = f"{t['plain']['params'] / 1e6:.1f}M params, {sh['batch']}×{sh['seq_len']} tokens, {t['dtype']}"
        for name in ("plain", "clex"):
            r = t[name]
            out.append((f"{name} training tokens/s, MFU ({what})",
                        f"{_num(r['train_tokens_per_s'])}, {100 * r['mfu']:.1f} %"))
        ratio = t["clex_over_plain_tokens_per_s"]
        out.append(("CLEX / plain tokens/s", f"{ratio['ratio']:.3f} (goal ≥ {ratio['goal']}: "
                                             f"{'pass' if ratio['pass'] else 'FAIL'})"))
        att = t["attention"]
        kernels = ", ".join(f"{k} {v['fwd_bwd_ms']:.2f} ms" if "fwd_bwd_ms" in v else f"{k}: {v['error']}"
                            for k, v in att.items() if isinstance(v, dict))
        out.append((f"attention fwd+bwd {tuple(att['shape'])}", kernels + ("" if att["flash_attn_installed"]
                                                                          else "; flash-attn not installed")))
        out.append(("longest single forward that fits", f"plain {_num(t['plain']['longest_forward_fits'])}, "
                                                        f"clex {_num(t['clex']['longest_forward_fits'])} tokens"))
    e = s.get("long_eval")
    if e:
        keys = [k for k in e if "longest" in k or "fits" in k] or [k for k, v in e.items() if not isinstance(v, (dict, list))]
        out.append(("progressive eval (benchmarks/long_eval.py)", ", ".join(f"{k} {e[k]}" for k in keys)))
    p = s.get("profile") or {}
    m = p.get("measured")
    if m:
        first, last, val = m["train_loss_first"], m["train_loss_last"], m["val_loss_last"]
        out.append((f"GPU profile, {p['steps']} pretraining steps", f"{_num(m['pretrain_tokens_per_s'])} tokens/s; train "
                    f"loss {first[1]:.2f} (step {first[0]}) → {last[1]:.2f} (step {last[0]})"
                    + (f"; val loss {val[1]:.2f}" if val else "") + f"; prepare {m['prepare_s']:.0f} s, start-up "
                    f"{m['pretrain_startup_s']:.0f} s" + (f", evaluate base {m['evaluate_base_s']:.0f} s"
                                                          if m.get("evaluate_base_s") is not None else "")))
        proj = p["projection"]
        parts = ", ".join(f"{k} {v / 60:.1f}" for k, v in proj["parts_s"].items())
        out.append(("projected `dvc repro ablations/discrete_vs_continuous` (GPU profile)",
                    f"{proj['total_min']} min ({parts} min)" + ("" if proj["evaluations_included"]
                                                               else "; evaluations not measured")))
    for name, st in s["parts"].items():
        if st["rc"] != 0:
            out.append((f"part {name} did not finish", f"exit {st['rc']} after {st['seconds']} s"
                        + (" (its timeout)" if st["rc"] in (124, 137) else "")))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("build/benchmarks"))
    args = ap.parse_args(argv)
    d = args.dir
    smi = (d / "gpu_smi.txt").read_text().strip().split(", ") if (d / "gpu_smi.txt").exists() else []
    t = read(d / "gpu_throughput.json") or {}
    summary = {"date": datetime.date.today().isoformat(),
               "gpu": {"name": smi[0] if smi else t.get("device", "n/a"), "memory": smi[1] if len(smi) > 1 else "n/a",
                       "driver": smi[2] if len(smi) > 2 else "n/a", "torch": t.get("torch", "n/a"),
                       "cuda": t.get("cuda", "n/a")},
               "parts": statuses(d / "gpu_check.status"), "throughput": t or None,
               "long_eval": read(d / "long_eval.json"), "profile": read(d / "gpu_profile.json")}
    table = "| figure | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows(summary))
    (d / "gpu.json").write_text(json.dumps(summary, indent=2))
    (d / "gpu.md").write_text(table)
    print(table)
    return summary


if __name__ == "__main__":
    main()
