"""GPU check, part (d) (run by benchmarks/gpu_check.sh): a few hundred pretraining steps of the GPU profile, and
the projected wall time of the whole profile from what they measure.

In a fresh copy of the repo's tracked files (--workdir; the user's params.yaml is never touched) it applies the
profile (`clex profile profiles/gpu.yaml`), then a second overlay with pretrain.steps = --steps, and runs the real
`clex prepare`, `clex pretrain` and, unless --no-eval, `clex evaluate base`, each timed and each under its own
timeout. It reports the pretraining tokens/s (build/base/run.json), the training loss at the first and last logged
step (MLflow), the validation loss, and the projection: prepare + the full pretraining at the measured tokens/s
+ every fine-tune (clex.profile.plan; CLEX's at --clex-ratio of that speed) + start-up per training stage (the
measured pretrain wall time minus its training seconds) + each evaluation at the measured `evaluate base` time.
`--overlay` adds overlays after the profile (the tests' CPU smoke run uses a tiny one). Writes JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ABLATION = "discrete_vs_continuous"


STUDY = ["clex", "experiments", "ablations", "analysis", "profiles", "dvc.yaml", "params.yaml", "pyproject.toml"]


def copy_repo(dest: Path) -> None:
    """The repo's tracked files (as in the working tree) into a fresh `dest`; without git, the study's folders."""
    shutil.rmtree(dest, ignore_errors=True)
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        names = [f.decode() for f in listed.split(b"\0") if f]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(REPO)) for s in STUDY for p in [REPO / s, *(REPO / s).rglob("*")]
                 if p.is_file() and "__pycache__" not in p.parts]
    for name in names:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def clex(study: Path, *args: str, timeout: float) -> dict:
    """Run `python -m clex.cli <args>` in the study; its wall seconds, exit status and output tail."""
    path = os.pathsep.join(filter(None, [str(study), os.environ.get("PYTHONPATH")]))  # and carried wheels
    env = {**os.environ, "PYTHONPATH": path, "MLFLOW_TRACKING_URI": f"sqlite:///{study / 'mlflow.db'}",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "clex.cli", *args], cwd=study, env=env, capture_output=True,
                              text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", f"timed out after {timeout:.0f} s: " + str((e.stdout or b"")[-500:])
    out = {"seconds": round(time.perf_counter() - start, 1), "rc": rc}
    if rc != 0:
        out["tail"] = tail
        print(f"clex {' '.join(args)}: exit {rc}\n{tail}", file=sys.stderr)
    return out


def losses(study: Path, run_id: str) -> dict:
    """First and last train_loss (with their steps) and the last val_loss of the pretraining's MLflow run."""
    sys.path.insert(0, str(study))
    from clex import tracking

    c = tracking.client(study)
    train = sorted(c.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
    val = sorted(c.get_metric_history(run_id, "val_loss"), key=lambda m: m.step)
    return {"train_loss_first": [train[0].step, train[0].value] if train else None,
            "train_loss_last": [train[-1].step, train[-1].value] if train else None,
            "val_loss_last": [val[-1].step, val[-1].value] if val else None}


def project(plan: dict, measured: dict, clex_ratio: float) -> dict:
    """Projected wall seconds of `dvc repro ablations/<ablation>` under the full profile, part by part."""
    tps = measured["pretrain_tokens_per_s"]
    startup = measured["pretrain_startup_s"]
    clex_share = 2 / 3  # clex and clex_discrete of the flagship's three fine-tuned experiments
    finetune = plan["finetune_tokens"] / tps * ((1 - clex_share) + clex_share / clex_ratio) + plan["finetunes"] * startup
    parts = {"prepare": measured["prepare_s"], "pretrain": plan["pretrain_tokens"] / tps + startup,
             "finetunes": finetune}
    if measured.get("evaluate_base_s") is not None:
        parts["evaluations"] = plan["evaluations"] * measured["evaluate_base_s"]
    return {"parts_s": {k: round(v, 1) for k, v in parts.items()}, "total_min": round(sum(parts.values()) / 60, 1),
            "evaluations_included": "evaluations" in parts, "clex_ratio": clex_ratio}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", type=Path, default=REPO / "profiles" / "gpu.yaml")
    ap.add_argument("--overlay", type=Path, action="append", default=[], help="more overlays after the profile")
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps to run (the profile's batch and L)")
    ap.add_argument("--no-eval", action="store_true", help="skip `clex evaluate base`")
    ap.add_argument("--clex-ratio", type=float, default=1.0, help="CLEX / plain training tokens/s (part a)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds for prepare + pretrain + evaluate together")
    ap.add_argument("--workdir", type=Path, default=REPO / "build" / "benchmarks" / "gpu_profile_study")
    ap.add_argument("--json", type=Path, default=REPO / "build" / "benchmarks" / "gpu_profile.json")
    args = ap.parse_args(argv)
    deadline = time.perf_counter() + args.timeout
    study = args.workdir.resolve()
    copy_repo(study)
    report: dict = {"profile": str(args.profile), "overlays": [str(o) for o in args.overlay], "steps": args.steps,
                    "workdir": str(study), "stages": {}}

    def left() -> float:
        return max(1.0, deadline - time.perf_counter())

    def finish() -> dict:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return report

    for overlay in [args.profile.resolve(), *[o.resolve() for o in args.overlay]]:
        applied = clex(study, "profile", str(overlay), timeout=120)
        if applied["rc"] != 0:
            report["stages"]["profile"] = applied
            return finish()
    sys.path.insert(0, str(study))
    from clex.config import load_study
    from clex.profile import plan

    report["plan"] = plan(load_study(study), ABLATION)  # the full profile (its pretrain.steps), before the short one
    short = study / "build" / "short_pretrain.yaml"
    short.parent.mkdir(parents=True, exist_ok=True)
    short.write_text(yaml.safe_dump({"pretrain": {"steps": args.steps}}))
    report["stages"]["profile"] = clex(study, "profile", str(short), timeout=120)
    for stage in ["prepare", "pretrain"] + ([] if args.no_eval else ["evaluate base"]):
        report["stages"][stage] = result = clex(study, *stage.split(), timeout=left())
        if result["rc"] != 0:
            break
    if report["stages"].get("pretrain", {}).get("rc") != 0:
        return finish()
    run = json.loads((study / "build" / "base" / "run.json").read_text())
    measured = {"prepare_s": report["stages"]["prepare"]["seconds"], "pretrain_tokens": run["train_tokens"],
                "pretrain_tokens_per_s": run["train_tokens_per_s"], "pretrain_train_s": run["train_seconds"],
                "pretrain_startup_s": round(report["stages"]["pretrain"]["seconds"] - run["train_seconds"], 1),
                **losses(study, run["run_id"])}
    if report["stages"].get("evaluate base", {}).get("rc") == 0:
        measured["evaluate_base_s"] = report["stages"]["evaluate base"]["seconds"]
    report["measured"] = measured
    report["projection"] = project(report["plan"], measured, args.clex_ratio)
    return finish()


if __name__ == "__main__":
    main()
