"""Where every stage reads and writes: the one map of `build/` and `reports/` (torch-free, stdlib only).

Every stage, the report, the sweep, the notebooks and the tests take their paths from here, and the
test of dvc.yaml checks that its `outs:` and `deps:` name the same folders. All paths are relative to
the study root; the functions return `root / <relative path>`.

    build/validated                      `clex validate`: marker that params and experiments passed
    build/experiments/<exp>.json         each experiment's resolved settings (what its fine-tune reads)
    build/data/                          `clex prepare`: tokenizer.json, token arrays, manifest
    build/base/                          `clex pretrain`: model.pt, run.json, frequencies.json
                                         (model.source hf: run.json, frequencies.json, source.json: the adopted
                                         checkpoint's path and hash, no weights)
    build/finetune/<exp>/seed<n>/        `clex finetune`: model.pt, run.json, frequencies.json
                                         (model.source hf: hf/ instead of model.pt: the HF checkpoint with
                                         clex_rope.json and clex_rope.pt, clex.hf.HFDecoder.save_pretrained)
    build/resume/<stage>/                checkpoints and state of an unfinished training run
    build/eval/base.json                 `clex evaluate base`
    build/eval/<exp>/seed<n>.json        `clex evaluate <exp> --seed <n>`
    build/sweeps/<sweep>.db              the Optuna storage (sqlite default), and trial folders beside it
    build/analysis/                      notebook staging and failures
    reports/<ablation>/                  `clex report`: table.md, ppl_vs_length.png, metrics.json, ...
    reports/sweeps/<sweep>/              best.yaml, trials.csv, metrics.json
    reports/analysis/                    executed notebooks and their figures

Outputs are written beside their final place and renamed into it (clex/io.py): a folder as `<name>.partial`,
files in a `.partial/` folder next to them; a `.partial` left behind is a write that was killed.
"""
from __future__ import annotations

from pathlib import Path

BUILD = Path("build")
REPORTS = Path("reports")


def validated(root: Path) -> Path:
    return Path(root) / BUILD / "validated"


def experiments_dir(root: Path) -> Path:
    """Resolved experiment settings, one JSON per experiment (`extends` applied)."""
    return Path(root) / BUILD / "experiments"


def experiment_json(root: Path, experiment: str) -> Path:
    return experiments_dir(root) / f"{experiment}.json"


def data_dir(root: Path) -> Path:
    return Path(root) / BUILD / "data"


def base_dir(root: Path) -> Path:
    return Path(root) / BUILD / "base"


def finetune_dir(root: Path, experiment: str, seed: int) -> Path:
    return Path(root) / BUILD / "finetune" / experiment / f"seed{seed}"


def resume_dir(root: Path, stage: str) -> Path:
    """A training run's checkpoints and state while it is unfinished (`stage`: its DVC stage or trial name)."""
    return Path(root) / BUILD / "resume" / stage


def eval_path(root: Path, experiment: str, seed: int | None) -> Path:
    """The eval JSON of the base model (experiment 'base') or of one (experiment, seed)."""
    folder = Path(root) / BUILD / "eval"
    return folder / "base.json" if experiment == "base" else folder / experiment / f"seed{seed}.json"


def sweep_dir(root: Path, sweep: str) -> Path:
    """The sweep's working folder (trial outputs); its default sqlite storage is `sweep_db`."""
    return Path(root) / BUILD / "sweeps" / sweep


def sweep_db(root: Path, sweep: str) -> Path:
    return Path(root) / BUILD / "sweeps" / f"{sweep}.db"


def analysis_build(root: Path) -> Path:
    return Path(root) / BUILD / "analysis"


def report_dir(root: Path, ablation: str) -> Path:
    return Path(root) / REPORTS / ablation


def sweep_report_dir(root: Path, sweep: str) -> Path:
    return Path(root) / REPORTS / "sweeps" / sweep


def analysis_reports(root: Path) -> Path:
    return Path(root) / REPORTS / "analysis"
