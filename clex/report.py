"""The ablation report, per evaluation protocol: test PPL by length (mean ± 95 % t-interval over seeds), the
paper's numbers beside the protocol they were measured with, paired differences against the reference
(t-interval and exact sign-flip p, clex/stats.py, docs/statistics.md) and validation PPL; passkey retrieval
once (it is scored with the primary protocol's forward).

Every number is read back from the MLflow runs named in the eval JSON (one run per protocol), not from the
JSON itself, so a table cell is exactly what the tracked run recorded. Protocols are ordered primary first
(the eval JSON's `primary`, the first of eval.protocols), then by name. Outputs, in reports/<ablation>/:
table.md (the report), ppl_vs_length.png (one panel per protocol), metrics.json (DVC metrics: mean test and
validation PPL per protocol, passkey accuracy), ppl_by_length.csv (DVC plots: the primary protocol's rows).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from clex import layout, tracking
from clex.config import NonFiniteError, ParamsError, Study
from clex.io import staged_files
from clex.stats import mean_ci, min_p, paired

PROTOCOL_DESCRIPTIONS = {  # one line each; the definitions are in docs/protocols.md
    "progressive": "The official CLEX evaluation: each window is fed in chunks of L tokens through a KV cache, "
                   "t is recomputed from the context so far (chunk j at t = j + 1, capped at t_max) and every "
                   "cached key is re-rotated; every prediction is scored once",
    "nonoverlapping": "Each window of n tokens in one forward pass at t = ceil(n/L); every prediction is scored",
    "sliding": "Windows of n tokens advanced by eval.stride, one forward pass each at t = ceil(n/L); each token "
               "is scored once, with at least n − stride tokens of context",
}
VALIDATION_HEADING = "### Validation perplexity (validation: use this to choose, never the test table)"


def protocol_order(primary: str, protocols) -> list[str]:
    """The protocols as every table lists them: the primary one first, then the others by name."""
    return [primary] + sorted(p for p in protocols if p != primary)


def statistics_note(n_seeds: int) -> list[str]:
    """What the intervals and p-values of a report mean, and what they cannot show (docs/statistics.md)."""
    return [
        "How to read the statistics (docs/statistics.md):",
        "",
        "- `a ± h` and `[low, high]`: mean over seeds and its 95 % Student-t interval (df = n − 1). The interval "
        "assumes the per-seed values (or paired differences) are roughly normal.",
        "- `p`: exact two-sided sign-flip test of the paired differences over all 2^n sign vectors. It assumes only "
        "that, with no effect, each seed's difference is as likely positive as negative (symmetry). With n seeds "
        f"the smallest possible p is 2/2^n: 0.25 at 3 seeds, 0.03125 at 6; here n = {n_seeds}, so p >= "
        f"{min_p(n_seeds):.4g}.",
        "- Only seed-to-seed variation of the fine-tune is captured (a seed sets the CLEX network's initial weights, "
        "the sampled t and positions, and the training windows; the base model, the data and the test documents "
        "are the same for every seed). "
        "Nothing here measures how the result would change with another base model, corpus or scale.",
    ]


# ---------------------------------------------------------------------------- reading the tracked runs
def protocol_runs(record: dict) -> dict[str, str]:
    """{protocol: MLflow run id} of one eval JSON (docs/protocols.md), in `protocol_order`."""
    return {p: record["protocols"][p]["run_id"] for p in protocol_order(record["primary"], record["protocols"])}


def run_values(c, run_id: str) -> tuple[dict, str]:
    """({metric: {length: value}}, protocol) of one evaluation run read with MlflowClient `c`: the length
    histories of `ppl`, `val_ppl`, `passkey_acc` and `passkey_exact` that the run logged, and passkey
    accuracy per depth ('depth0.5'; the primary protocol's run only)."""
    run = c.get_run(run_id)
    values = {k: {int(m.step): m.value for m in c.get_metric_history(run_id, k)}
              for k in ("ppl", "val_ppl", "passkey_acc", "passkey_exact")}
    values = {k: v for k, v in values.items() if v}
    for key, v in run.data.metrics.items():  # passkey_acc_<length>_depth<depth>
        if key.startswith("passkey_acc_"):
            n, depth = key.removeprefix("passkey_acc_").split("_depth")
            values.setdefault(f"depth{float(depth)}", {})[int(n)] = v
    return values, run.data.tags["eval_protocol"]


def rows(experiment: str, seed: int, protocol: str, run_id: str, values: dict, lengths: list[int],
         keys: list[str]) -> list[dict]:
    """One long-format row per length: experiment, seed, protocol, length, the `keys` of `values` at that
    length, run_id. A key the run did not log at a length, or a NaN or infinite value, is an error naming the run."""
    missing = [(k, n) for k in keys for n in lengths if n not in values.get(k, {})]
    if missing:
        raise ValueError(f"MLflow run {run_id} ({experiment}, seed {seed}, protocol {protocol}) has no "
                         f"{missing[:4]} (metric, length); rerun its evaluation stage (dvc repro)")
    bad = [(k, n, values[k][n]) for k in keys for n in lengths if not math.isfinite(values[k][n])]
    if bad:
        k, n, v = bad[0]
        raise NonFiniteError(f"MLflow run {run_id} ({experiment}, seed {seed}, protocol {protocol}): metric {k} at "
                             f"length {n} is {v} ({len(bad)} non-finite values); the report refuses non-finite results: "
                             "rerun that evaluation on a sound checkpoint (dvc repro --force its evaluate stage)")
    return [{"experiment": experiment, "seed": seed, "protocol": protocol, "length": n,
             **{k: values[k][n] for k in keys}, "run_id": run_id} for n in lengths]


# ---------------------------------------------------------------------------- tables
def summarise(df, names: list[str], lengths: list[int], col: str) -> dict:
    """{experiment: {length: (mean, t-interval half-width)}} of column `col` over seeds."""
    return {e: {n: mean_ci(df[(df.experiment == e) & (df.length == n)][col].tolist()) for n in lengths}
            for e in names}


def ppl_table(summary: dict, names: list[str], lengths: list[int], L: int) -> list[str]:
    """The markdown table of PPL by length (mean ± 95 % t-interval), one row per experiment."""
    md = ["| experiment | " + " | ".join(f"{n} ({n // L}×L)" for n in lengths) + " |",
          "|---|" + "---|" * len(lengths)]
    for e in names:
        label = "base (plain RoPE, no fine-tune)" if e == "base" else e
        md.append(f"| {label} | " + " | ".join(fmt_ci(*summary[e][n]) for n in lengths) + " |")
    return md


def fmt_ci(mean: float, half: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" if np.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def protocol_sections(df, ab, names: list[str], lengths: list[int], seeds: list[int], L: int,
                      protocols: list[str]) -> list[str]:
    """Per protocol (primary first): test PPL, the paper's numbers (beside the protocol they were measured
    with only), paired differences against the reference, validation PPL. `df` holds every protocol's rows."""
    md = []
    for i, proto in enumerate(protocols):
        d = df[df.protocol == proto]
        summary = summarise(d, names, lengths, "ppl")
        md += ["", f"## Protocol `{proto}`" + (" (primary)" if i == 0 else ""), "",
               PROTOCOL_DESCRIPTIONS.get(proto, proto) + " (docs/protocols.md).", "",
               "### Test perplexity by evaluation length (mean ± 95 % t-interval over seeds)", ""]
        md += ppl_table(summary, names, lengths, L)
        md += paper_section(ab, summary, L, proto)
        ref = ab.reference or ab.experiments[0]
        md += paired_section(d, ab, lengths, seeds, L, "ppl", f"PPL(x) − PPL({ref})", "{:+.2f}")
        if "val_ppl" in d and d.val_ppl.notna().all():  # (runs from before validation PPL was logged have none)
            md += ["", VALIDATION_HEADING, "",
                   "The same windows for every model, from the validation split (eval.val_windows), scored like the "
                   "test documents. Recipes are chosen on these numbers; the test table above is only reported.", ""]
            md += ppl_table(summarise(d, names, lengths, "val_ppl"), names, lengths, L)
    if ab.paper is not None and ab.paper.protocol not in protocols:
        md += ["", f"The paper's numbers ({ab.paper.source}) were measured with protocol `{ab.paper.protocol}`, "
               f"which this evaluation did not run (eval.protocols: {protocols}); they are not shown."]
    return md


def paired_section(df, ab, lengths, seeds, L, col: str, what: str, fmt: str) -> list[str]:
    """Per-seed paired differences of `col` against the ablation's reference: mean, 95 % t-interval and the
    exact sign-flip p (clex/stats.py), over `seeds`."""
    ref = ab.reference or ab.experiments[0]
    others = [e for e in ab.experiments if e != ref]
    if not others:
        return []
    md = ["", f"### Paired difference against `{ref}` ({what}, same seed; mean [95 % t-interval], sign-flip p)", "",
          f"Over seeds {list(seeds)}. An interval that excludes 0, or a small p, says the difference is larger than "
          f"seed-to-seed noise; with {len(seeds)} seeds p cannot go below {min_p(len(seeds)):.4g}"
          + (", so the sign-flip test cannot reject at the 5 % level." if min_p(len(seeds)) > 0.05 else "."), "",
          "| experiment | " + " | ".join(f"{n // L}×L" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for e in others:
        cells = []
        for n in lengths:
            a = df[(df.experiment == e) & (df.length == n)].set_index("seed")[col]
            b = df[(df.experiment == ref) & (df.length == n)].set_index("seed")[col]
            cells.append(fmt_paired(paired((a - b).loc[list(seeds)].tolist()), fmt))
        md.append(f"| {e} | " + " | ".join(cells) + " |")
    return md


def fmt_paired(r, fmt: str) -> str:
    """'+1.23 [-0.40, +2.86] p 0.25' (the mean alone below two seeds)."""
    if r.n < 2:
        return fmt.format(r.mean)
    return f"{fmt.format(r.mean)} [{fmt.format(r.low)}, {fmt.format(r.high)}] p {r.p:.3g}"


def paper_section(ab, summary, L, protocol: str) -> list[str]:
    """The paper's PPLs beside ours at the same multiples of L, under the protocol they were measured with
    ([] for any other protocol); '—' where the paper gives none, 'n/a' where we have no such length."""
    if ab.paper is None or ab.paper.protocol != protocol:
        return []
    pp = ab.paper
    md = ["", "### The paper's numbers beside ours", "",
          f"Source: {pp.source}", "",
          f"Measured with protocol `{pp.protocol}`, as the table above. Lengths are matched as multiples of the "
          "training length (the paper: LLaMA-2-7B, L = 4k). Compare shapes, not levels (docs/deviations.md).", "",
          "| experiment | " + " | ".join(f"{lab} paper / ours ({m}×L)" for lab, m in zip(pp.lengths, pp.multipliers)) + " |",
          "|---|" + "---|" * len(pp.lengths)]
    for e, row in pp.ppl.items():
        ours = [summary[e][m * L][0] if e in summary and m * L in summary[e] else None for m in pp.multipliers]
        cells = [f"{paper_cell(v)} / {'n/a' if o is None else f'{o:.2f}'}" for v, o in zip(row, ours)]
        md.append(f"| {e} | " + " | ".join(cells) + " |")
    return md


def paper_cell(v: float | str | None) -> str:
    """A paper value as printed: two decimals, a bound such as '>100' as given, '—' where the paper has none."""
    return "—" if v is None else v if isinstance(v, str) else f"{v:.2f}"


def run_lines(df, names: list[str], protocols: list[str]) -> list[str]:
    """'- <protocol>/<experiment>/seed<s>: `<run id>`' for every evaluation run behind the tables."""
    runs = df.drop_duplicates(["protocol", "experiment", "seed"]).set_index(["protocol", "experiment", "seed"]).run_id
    return [f"- {p}/{e}/seed{s}: `{runs[(p, e, s)]}`" for p in protocols for e in names
            for s in sorted(df[(df.protocol == p) & (df.experiment == e)].seed.unique())]


def passkey_section(df, ab, names, lengths, seeds, L, passkey, primary: str) -> list[str]:
    """Passkey retrieval (scored once, with the primary protocol's forward): digit accuracy (mean ± t-interval),
    exact-match share, accuracy by depth, paired differences of digit accuracy."""
    depths = [f"depth{d}" for d in passkey.depths]
    acc, exact = summarise(df, names, lengths, "passkey_acc"), summarise(df, names, lengths, "passkey_exact")
    head = ["| experiment | " + " | ".join(f"{n // L}×L" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    md = ["", f"## Passkey retrieval: teacher-forced digit accuracy (mean ± 95 % t-interval over seeds; protocol "
          f"`{primary}`)", "",
          f"{passkey.samples} examples per length and depth at depths {passkey.depths}, the same for every "
          f"model; {passkey.digits} digits, chance ≈ 0.1. {passkey.train_fraction:.0%} of every fine-tune's "
          "sequences were passkey examples at training length (the base model saw none).", ""] + head
    md += [f"| {e} | " + " | ".join(fmt_ci(*acc[e][n], digits=3) for n in lengths) + " |" for e in names]
    md += ["", "Share of keys with every digit right (mean over seeds):", ""] + head
    md += [f"| {e} | " + " | ".join(f"{exact[e][n][0]:.3f}" for n in lengths) + " |" for e in names]
    md += ["", "Digit accuracy by needle depth (0 = start of the filler, 1 = just before the question; mean over seeds):",
           "", "| experiment | depth | " + " | ".join(f"{n // L}×L" for n in lengths) + " |",
           "|---|---|" + "---|" * len(lengths)]
    means = df.groupby(["experiment", "length"])[depths].mean()
    md += [f"| {e} | {d.removeprefix('depth')} | " + " | ".join(f"{means.loc[(e, n), d]:.3f}" for n in lengths) + " |"
           for e in names for d in depths]
    ref = ab.reference or ab.experiments[0]
    return md + paired_section(df, ab, lengths, seeds, L, "passkey_acc", f"accuracy(x) − accuracy({ref})", "{:+.3f}")


# ---------------------------------------------------------------------------- the report
class MissingRunsError(ParamsError):
    """Evaluation runs that eval JSONs name are not in the MLflow store, or did not finish (`check_runs`)."""

    kind = "MLflow runs missing"


def check_runs(study: Study, c, ablation: str, evals: dict[str, tuple[Path, dict]]) -> None:
    """Every run that the eval JSONs of an ablation ({stage: (path, record)}) name must be in the store (read with
    MlflowClient `c`) and FINISHED, else MissingRunsError naming each stage, its runs and the command that recreates them.

    A deleted or replaced mlflow.db (or a run deleted in the UI) loses them; a stage killed between moving its
    eval JSON into place and closing its runs leaves them RUNNING. DVC cannot see either (it hashes files, not
    a database), so the command forces those stages (`--single-item`: them only, not their upstream stages;
    `--force`: DVC's run cache would otherwise restore the same JSON, naming the same runs), then the report
    (its inputs, the eval JSONs, have changed).
    """
    bad = {}
    for stage, (path, record) in evals.items():
        for protocol, run_id in protocol_runs(record).items():
            status = tracking.run_status(c, run_id)
            if status != "FINISHED":
                bad.setdefault(stage, []).append(
                    f"{protocol} run {run_id} {'is not in the store' if status is None else 'is ' + status}")
    if bad:
        lines = [f"  {stage} ({evals[stage][0].relative_to(study.root)}): {'; '.join(why)}" for stage, why in bad.items()]
        raise MissingRunsError(
            f"the MLflow store {tracking.tracking_uri(study.root)} lacks finished runs that {len(bad)} evaluation "
            "outputs name (a deleted or replaced mlflow.db loses them; a stage interrupted after writing its output "
            "leaves them RUNNING):\n" + "\n".join(lines) + "\nRecreate them (this reruns only those evaluations), "
            f"then the report:\n  dvc repro --force --single-item {' '.join(bad)} && dvc repro ablations/{ablation}")


def load_frame(study: Study, names: list[str], ablation: str):
    """(long frame of every protocol's rows, protocols in order) for the base model and `names`' seeds, read
    from the MLflow runs each eval JSON names (which must all be there: `check_runs`). Every eval JSON must list
    the same protocols."""
    import pandas as pd

    p = study.params
    depths = [f"depth{d}" for d in p.passkey.depths]
    evals = {}  # {stage: (path, record)}
    for exp in names:
        for seed in [p.pretrain.seed] if exp == "base" else p.finetune.seeds:
            stage = "evaluate_base" if exp == "base" else study.evaluate_stage(exp, seed)
            path = layout.eval_path(study.root, exp, seed)
            evals[stage] = (path, json.loads(path.read_text()))
    c = tracking.client(study.root)
    check_runs(study, c, ablation, evals)
    records, protocols = [], None
    for path, record in evals.values():
        exp, seed = record["experiment"], record["seed"]
        runs = protocol_runs(record)
        if protocols is None:
            protocols = list(runs)
        if list(runs) != protocols:
            raise ValueError(f"{path}: protocols {list(runs)}, other evaluations have {protocols}; rerun the "
                             "evaluations (dvc repro) so that all use the same eval.protocols")
        for i, (proto, run_id) in enumerate(runs.items()):
            values, tagged = run_values(c, run_id)
            if tagged != proto:
                raise ValueError(f"{path}: run {run_id} is listed for protocol {proto} but tagged "
                                 f"eval_protocol={tagged}")
            keys = ["ppl", "val_ppl"] + (["passkey_acc", "passkey_exact"] + depths if i == 0 else [])
            records += rows(exp, seed, proto, run_id, values, p.eval.lengths, keys)
    return pd.DataFrame(records), protocols


def build_report(study: Study, ablation_name: str) -> Path:
    """Write reports/<ablation>/ and record the report as an MLflow run; returns the report folder."""
    ab = study.ablation(ablation_name)
    p = study.params
    L, lengths, seeds = p.model.train_len, p.eval.lengths, p.finetune.seeds
    names = ["base"] + ab.experiments
    df, protocols = load_frame(study, names, ablation_name)
    primary = df[df.protocol == protocols[0]]

    out = layout.report_dir(study.root, ablation_name)
    with staged_files(out) as tmp:  # files move into place only once all exist (DVC keeps a .gitignore in out)
        md = [f"# Ablation: {ab.name}", "", ab.question, "",
              f"Knob: `{ab.knob}`. Seeds: {seeds} ({len(seeds)} per experiment; the base model has one).",
              f"Eval protocols: **{protocols[0]}** (primary)" + "".join(f", {q}" for q in protocols[1:])
              + f"; training length L = {L}; PPL on {len(lengths)} lengths, the same test tokens at every length "
              "and under every protocol.", ""]
        md += statistics_note(len(seeds))
        md += protocol_sections(df, ab, names, lengths, seeds, L, protocols)
        md += passkey_section(primary, ab, names, lengths, seeds, L, p.passkey, protocols[0])
        md += ["", "## Runs behind these numbers (MLflow run ids, one evaluation run per protocol)", ""]
        md += run_lines(df, names, protocols)
        (tmp / "table.md").write_text("\n".join(md) + "\n")
        primary.to_csv(tmp / "ppl_by_length.csv", index=False)  # DVC plots: x = length, y = ppl of one protocol
        (tmp / "metrics.json").write_text(json.dumps(metrics(df, names, lengths, protocols), indent=2))
        plot_ppl(df, tmp / "ppl_vs_length.png", ab.name, L, protocols)
        _record(study, ab.name, tmp, df, protocols)
    return out


def metrics(df, names: list[str], lengths: list[int], protocols: list[str]) -> dict:
    """DVC metrics: {experiment: {ppl: {protocol: {length: mean}}, val_ppl: {…}, passkey_acc: {length: mean}}}."""
    by = {q: df[df.protocol == q] for q in protocols}

    def means(q: str, col: str) -> dict:
        return {e: {str(n): round(m, 4) for n, (m, _) in v.items()}
                for e, v in summarise(by[q], names, lengths, col).items()}

    ppl, val = {q: means(q, "ppl") for q in protocols}, {q: means(q, "val_ppl") for q in protocols}
    passkey = means(protocols[0], "passkey_acc")
    return {e: {"ppl": {q: ppl[q][e] for q in protocols}, "val_ppl": {q: val[q][e] for q in protocols},
                "passkey_acc": passkey[e]} for e in names}


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


def plot_ppl(df, path: Path, title: str, L: int, protocols: list[str]) -> None:
    """The report's PPL-vs-length figure, one panel per protocol (draw_by_length), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(protocols), figsize=(1 + 5.5 * len(protocols), 4.2), sharey=True, squeeze=False)
    for ax, proto in zip(axes[0], protocols):
        draw_by_length(ax, df[df.protocol == proto], f"{title}: {proto}", L)
    for ax in axes[0][:-1]:
        ax.get_legend().remove()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _record(study: Study, name: str, folder: Path, df, protocols: list[str]) -> None:
    """The report itself is an MLflow run: its source run ids (one per protocol × experiment × seed) as
    params `source_run.<protocol>/<experiment>/seed<s>`, its files as artifacts."""
    root = study.root
    stage = f"ablations/{name}"
    sources = df.drop_duplicates(["protocol", "experiment", "seed"])
    tracking.close_stale_runs(root, stage)
    params = {f"source_run.{r.protocol}/{r.experiment}/seed{r.seed}": r.run_id for r in sources.itertuples()}
    tags = tracking.run_tags(root, stage, "report", ablation=name, eval_protocol=",".join(protocols),
                             model_source=study.params.model.source_tag)
    with tracking.open_run(root, stage, tags, params) as run_id:
        c = tracking.client(root)
        for f in ("table.md", "ppl_vs_length.png", "metrics.json", "ppl_by_length.csv"):
            c.log_artifact(run_id, str(folder / f), artifact_path="report")
        _comparison_runs(study, c, name, df, protocols, run_id)


# ---------------------------------------------------------------------------- the MLflow UI's comparison view
def comparison_experiment(ablation: str) -> str:
    """The MLflow experiment that holds one ablation's comparison runs."""
    return f"{tracking.MLFLOW_EXPERIMENT}/{ablation}"


def comparison_metrics(df, experiment: str, protocols: list[str]) -> list[tuple[str, float, int]]:
    """(key, value, step = length) of one experiment's comparison run, from the rows the tables average: `ppl`
    (the primary protocol's test PPL, mean over seeds), `ppl_<protocol>` for every protocol, `ppl_seed<s>`
    (primary, each seed), and the means of `val_ppl` and `passkey_acc` (primary)."""
    rows = df[df.experiment == experiment]
    out = []
    for n, g in rows[rows.protocol == protocols[0]].groupby("length"):
        out += [("ppl", g.ppl.mean(), n), ("val_ppl", g.val_ppl.mean(), n), ("passkey_acc", g.passkey_acc.mean(), n)]
        out += [(f"ppl_seed{seed}", v, n) for seed, v in zip(g.seed, g.ppl)]
    for q in protocols:
        out += [(f"ppl_{q}", g.ppl.mean(), n) for n, g in rows[rows.protocol == q].groupby("length")]
    return [(k, float(v), int(n)) for k, v, n in out]


def _comparison_runs(study: Study, c, name: str, df, protocols: list[str], report_run: str) -> None:
    """The ablation in the MLflow UI, one click from its experiment page: MLflow experiment `clex-study/<ablation>`
    holds one top-level run per compared experiment (named after it, the base model included), whose metrics with
    step = eval length are the report's curves (`comparison_metrics`), so the runs page's chart view draws PPL vs
    length across the experiments without expanding any nested run. Each run names the evaluation runs it
    averages (params `source_run.<protocol>/seed<s>`) and the report run (tag `report_run_id`). The previous
    report's comparison runs are deleted (MLflow's soft delete: restorable; the evaluation runs hold the records).
    `c`: the report's MlflowClient."""
    root, stage = study.root, f"ablations/{name}"
    experiment = comparison_experiment(name)
    for old in c.search_runs([tracking.experiment_id(root, experiment)], max_results=1000):
        c.delete_run(old.info.run_id)
    names = list(dict.fromkeys(df.experiment))
    for exp in reversed(names):  # the runs page lists the newest first: the base model on top
        rows = df[df.experiment == exp].drop_duplicates(["protocol", "seed"])
        params = {f"source_run.{r.protocol}/seed{r.seed}": r.run_id for r in rows.itertuples()}
        tags = tracking.run_tags(root, stage, "comparison", ablation=name, experiment=exp, report_run_id=report_run,
                                 seeds=",".join(str(s) for s in sorted(set(rows.seed))), eval_protocol=protocols[0])
        with tracking.open_run(root, exp, tags, params, experiment=experiment) as run_id:
            tracking.log_metrics(c, run_id, comparison_metrics(df, exp, protocols))
