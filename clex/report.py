"""The ablation report: PPL by length (mean ± 95 % CI over seeds), paired differences, the paper beside us.

Every number is read back from the MLflow run named in the eval JSON (not from the JSON itself), so a
table cell is exactly what the tracked run recorded. Outputs, in reports/<ablation>/:
table.md (the report: PPL, passkey accuracy overall and by depth, paired differences, the paper's numbers),
ppl_vs_length.png (seaborn), metrics.json (DVC metrics), ppl_by_length.csv (DVC plots).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from scipy import stats

from clex import tracking
from clex.config import Study

BOOTSTRAP_SAMPLES = 10_000


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval (nan for a single seed)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def bootstrap_ci(diffs: list[float], level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-seed paired differences."""
    x = np.asarray(diffs, dtype=float)
    rng = np.random.default_rng(seed)
    means = rng.choice(x, size=(BOOTSTRAP_SAMPLES, len(x)), replace=True).mean(axis=1)
    return float(np.quantile(means, 0.5 - level / 2)), float(np.quantile(means, 0.5 + level / 2))


def tracked(study: Study, experiment: str, seed: int | None) -> tuple[str, dict, str]:
    """(run id, {metric: {length: value}}, protocol) from the MLflow run behind one eval output."""
    from clex.evaluate import eval_path  # torch and lightning, only for the eval JSON's path

    record = json.loads(eval_path(study, experiment, seed).read_text())
    return (record["run_id"], *run_values(tracking.client(study.root), record["run_id"]))


def run_values(c, run_id: str) -> tuple[dict, str]:
    """({metric: {length: value}}, protocol) of one evaluation run read with MlflowClient `c`: the length
    histories of `ppl`, `passkey_acc` and `passkey_exact`, and passkey accuracy per depth ('depth0.5')."""
    run = c.get_run(run_id)
    values = {k: {int(m.step): m.value for m in c.get_metric_history(run_id, k)}
              for k in ("ppl", "passkey_acc", "passkey_exact")}
    for key, v in run.data.metrics.items():  # passkey_acc_<length>_depth<depth>
        if key.startswith("passkey_acc_"):
            n, depth = key.removeprefix("passkey_acc_").split("_depth")
            values.setdefault(f"depth{float(depth)}", {})[int(n)] = v
    return values, run.data.tags["eval_protocol"]


def rows(experiment: str, seed: int, values: dict, lengths: list[int], keys: list[str]) -> list[dict]:
    """One long-format row per length: experiment, seed, length and the `keys` of `values` at that length."""
    return [{"experiment": experiment, "seed": seed, "length": n, **{k: values[k][n] for k in keys}} for n in lengths]


def summarise(df, names: list[str], lengths: list[int], col: str) -> dict:
    """{experiment: {length: (mean, t-CI half-width)}} of column `col` over seeds."""
    return {e: {n: mean_ci(df[(df.experiment == e) & (df.length == n)][col].tolist()) for n in lengths}
            for e in names}


def ppl_table(summary: dict, names: list[str], lengths: list[int], L: int) -> list[str]:
    """The markdown table of PPL by length (mean ± 95 % t-CI), one row per experiment."""
    md = ["| experiment | " + " | ".join(f"{n} ({n // L}×L)" for n in lengths) + " |",
          "|---|" + "---|" * len(lengths)]
    for e in names:
        label = "base (plain RoPE, no fine-tune)" if e == "base" else e
        md.append(f"| {label} | " + " | ".join(fmt_ci(*summary[e][n]) for n in lengths) + " |")
    return md


def fmt_ci(mean: float, half: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" if np.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def build_report(study: Study, ablation_name: str) -> Path:
    """Write reports/<ablation>/ and record the report as an MLflow run; returns the report folder."""
    import pandas as pd

    ab = study.ablation(ablation_name)
    p = study.params
    L, lengths, seeds = p.model.train_len, p.eval.lengths, p.finetune.seeds
    depths = [f"depth{d}" for d in p.passkey.depths]
    records, runs, protocols = [], {}, set()
    for exp in ["base"] + ab.experiments:
        for seed in [p.pretrain.seed] if exp == "base" else seeds:
            run_id, values, protocol = tracked(study, exp, seed)
            runs[f"{exp}/seed{seed}"] = run_id
            protocols.add(protocol)
            records += rows(exp, seed, values, lengths, ["ppl", "passkey_acc", "passkey_exact"] + depths)
    df = pd.DataFrame(records)
    names = ["base"] + ab.experiments
    ref = ab.reference or ab.experiments[0]
    summary, passkey = summarise(df, names, lengths, "ppl"), summarise(df, names, lengths, "passkey_acc")

    out = study.root / "reports" / ablation_name
    tmp = out / ".partial"  # files move into place only once all of them exist (DVC keeps a .gitignore in out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    md = [f"# Ablation: {ab.name}", "", ab.question, "",
          f"Knob: `{ab.knob}`. Seeds: {seeds} ({len(seeds)} per experiment; the base model has one).",
          f"Eval protocol: **{', '.join(sorted(protocols))}**; training length L = {L}; "
          f"PPL on {len(lengths)} lengths, the same test tokens at every length.", "",
          "## Perplexity by evaluation length (mean ± 95 % t-CI over seeds)", ""]
    md += ppl_table(summary, names, lengths, L)
    md += paired_section(df, ab, lengths, seeds, L, "ppl", f"PPL(x) − PPL({ref})", "{:+.2f}")
    md += paper_section(ab, summary, L)
    md += ["", "## Passkey retrieval: teacher-forced digit accuracy (mean ± 95 % t-CI over seeds)", "",
           f"{p.passkey.samples} examples per length and depth at depths {p.passkey.depths}, the same for every "
           f"model; {p.passkey.digits} digits, chance ≈ 0.1. {p.passkey.train_fraction:.0%} of every fine-tune's "
           "sequences were passkey examples at training length (the base model saw none).", "",
           "| experiment | " + " | ".join(f"{n // L}×L" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    md += [f"| {e} | " + " | ".join(fmt_ci(*passkey[e][n], digits=3) for n in lengths) + " |" for e in names]
    exact = summarise(df, names, lengths, "passkey_exact")
    md += ["", "Share of keys with every digit right (mean over seeds):", "",
           "| experiment | " + " | ".join(f"{n // L}×L" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    md += [f"| {e} | " + " | ".join(f"{exact[e][n][0]:.3f}" for n in lengths) + " |" for e in names]
    md += ["", "Digit accuracy by needle depth (0 = start of the filler, 1 = just before the question; mean over seeds):",
           "", "| experiment | depth | " + " | ".join(f"{n // L}×L" for n in lengths) + " |",
           "|---|---|" + "---|" * len(lengths)]
    means = df.groupby(["experiment", "length"])[depths].mean()
    md += [f"| {e} | {d.removeprefix('depth')} | " + " | ".join(f"{means.loc[(e, n), d]:.3f}" for n in lengths) + " |"
           for e in names for d in depths]
    md += paired_section(df, ab, lengths, seeds, L, "passkey_acc", f"accuracy(x) − accuracy({ref})", "{:+.3f}")
    md += ["", "## Runs behind these numbers (MLflow run ids)", ""]
    md += [f"- {k}: `{v}`" for k, v in runs.items()]
    (tmp / "table.md").write_text("\n".join(md) + "\n")
    df.to_csv(tmp / "ppl_by_length.csv", index=False)
    metrics = {e: {"ppl": {str(n): round(summary[e][n][0], 4) for n in lengths},
                   "passkey_acc": {str(n): round(passkey[e][n][0], 4) for n in lengths}} for e in names}
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_ppl(df, tmp / "ppl_vs_length.png", ab.name, L)
    _record(study, ab.name, tmp, runs, protocols)
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()
    return out


def paired_section(df, ab, lengths, seeds, L, col: str, what: str, fmt: str) -> list[str]:
    """Per-seed paired differences of `col` against the ablation's reference, with bootstrap CIs."""
    ref = ab.reference or ab.experiments[0]
    others = [e for e in ab.experiments if e != ref]
    if not others:
        return []
    md = ["", f"### Paired difference against `{ref}` ({what}, same seed; mean [95 % bootstrap CI])", "",
          "A CI that excludes 0 means the difference holds across seeds. With 3 seeds the bootstrap is coarse.", "",
          "| experiment | " + " | ".join(f"{n // L}×L" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for e in others:
        cells = []
        for n in lengths:
            a = df[(df.experiment == e) & (df.length == n)].set_index("seed")[col]
            b = df[(df.experiment == ref) & (df.length == n)].set_index("seed")[col]
            diffs = (a - b).loc[seeds].tolist()
            lo, hi = bootstrap_ci(diffs) if len(diffs) > 1 else (float("nan"), float("nan"))
            cells.append(fmt.format(np.mean(diffs)) + ("" if np.isnan(lo) else f" [{fmt.format(lo)}, {fmt.format(hi)}]"))
        md.append(f"| {e} | " + " | ".join(cells) + " |")
    return md


def paper_section(ab, summary, L) -> list[str]:
    """The paper's PPLs beside ours at the same multiples of L ('n/a' where we have no such length)."""
    if ab.paper is None:
        return []
    pp = ab.paper
    md = ["", f"## The paper's numbers beside ours ({pp.source})", "",
          "Lengths are matched as multiples of the training length (the paper: LLaMA-2-7B, L = 4k).", "",
          "| experiment | " + " | ".join(f"{lab} paper / ours ({m}×L)" for lab, m in zip(pp.lengths, pp.multipliers)) + " |",
          "|---|" + "---|" * len(pp.lengths)]
    for e, row in pp.ppl.items():
        ours = [summary[e][m * L][0] if e in summary and m * L in summary[e] else None for m in pp.multipliers]
        cells = [f"{v} / {'n/a' if o is None else f'{o:.2f}'}" for v, o in zip(row, ours)]
        md.append(f"| {e} | " + " | ".join(cells) + " |")
    return md


def t_interval(values) -> tuple[float, float]:
    """The table's interval (mean ± Student-t half-width) as seaborn's errorbar callable wants it."""
    mean, half = mean_ci(list(values))
    half = 0.0 if np.isnan(half) else half
    return mean - half, mean + half


def draw_by_length(ax, df, title: str, L: int, y: str = "ppl", ylabel: str = "perplexity (mean, 95 % t-CI over seeds)",
                   log_y: bool = True, bands: bool = True) -> None:
    """`y` against evaluation length per experiment on `ax`: mean and 95 % t-CI band over seeds (no band if
    not `bands`), log x (log y unless `log_y` is False), a dashed line at the training length L."""
    import seaborn as sns
    from matplotlib.ticker import NullLocator, ScalarFormatter

    sns.lineplot(data=df, x="length", y=y, hue="experiment", marker="o", errorbar=t_interval if bands else None, ax=ax)
    ax.set(xscale="log", yscale="log" if log_y else "linear", xlabel="evaluation length (tokens)",
           ylabel=ylabel, title=title)
    ax.axvline(L, color="grey", ls="--", lw=1)
    lengths = sorted(df.length.unique())
    ax.set_xticks(lengths, [str(v) for v in lengths])
    ax.xaxis.set_minor_locator(NullLocator())
    if log_y:
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())


def plot_ppl(df, path: Path, title: str, L: int) -> None:
    """The report's PPL-vs-length figure (draw_by_length on a 6.5 × 4.2 in figure), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    draw_by_length(ax, df, title, L)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _record(study: Study, name: str, folder: Path, runs: dict, protocols: set) -> None:
    """The report itself is an MLflow run: its source run ids as params, its files as artifacts."""
    import mlflow

    root = study.root
    stage = f"ablations/{name}"
    tracking.close_stale_runs(root, stage)
    with mlflow.start_run(experiment_id=tracking.experiment_id(root), run_name=stage,
                          tags={"role": "report", "ablation": name, "dvc_stage": stage,
                                "git_commit": tracking.git_commit(root), "eval_protocol": ",".join(sorted(protocols))}):
        mlflow.log_params({f"source_run.{k}": v for k, v in runs.items()})
        for f in ("table.md", "ppl_vs_length.png", "metrics.json", "ppl_by_length.csv"):
            mlflow.log_artifact(str(folder / f), artifact_path="report")
