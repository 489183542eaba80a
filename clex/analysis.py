"""What the notebooks in analysis/ compute, read from the MLflow store alone (nothing here trains or evaluates).

Runs are read from experiment `clex-study` of the store at `store_uri(root, tracking_uri)`. A DVC stage that
was rerun leaves one run per attempt under the same `tags.dvc_stage`; only the latest FINISHED run of each
stage counts (`latest_per_stage`): it is the one whose outputs DVC holds, and failed or killed attempts are
never numbers. An evaluation stage writes one run per protocol (`tags.eval_protocol`, the primary one tagged
`eval_primary=true`), so evaluations count per stage × protocol (`eval_frame`). Sweep trials count once per
sweep × trial number, the latest run (`trial_table`).

Frames are long (one row per experiment × seed × length, or × step) so seaborn can draw them as they come;
the tables reuse clex/report.py and the statistics clex/stats.py (the same t-intervals, sign-flip p-values
and markdown as `clex report`).
"""
from __future__ import annotations

import ast
import contextlib
import itertools
import os
from pathlib import Path

import numpy as np
import pandas as pd

from clex import report, stats, tracking
from clex.config import Ablation, Study

NOT_RUN = "not run"
ALL = "all"  # eval_frame(uri, ALL): every protocol's runs (the default is the primary protocol's)
FLAT = 1e-5  # a profile whose spread over i is below this share of its size is flat (float32 θ rounds at ~1e-7)


# ---------------------------------------------------------------------------- runs
def store_uri(root: str | Path = ".", tracking_uri: str | None = None) -> str:
    """The store the notebooks read: `tracking_uri` if given, else MLFLOW_TRACKING_URI, else
    sqlite:///<root>/mlflow.db."""
    return tracking_uri or tracking.tracking_uri(Path(root))


def runs(uri: str, role: str | None = None) -> pd.DataFrame:
    """Every run of the study's experiment (of one `tags.role` if given), as `mlflow.search_runs` returns them;
    an empty frame when the store has no such experiment or run."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(tracking.MLFLOW_EXPERIMENT) is None:
        return pd.DataFrame()
    return mlflow.search_runs(experiment_names=[tracking.MLFLOW_EXPERIMENT], max_results=100_000,
                              filter_string=f"tags.role = '{role}'" if role else "")


def latest_per_stage(df: pd.DataFrame) -> pd.DataFrame:
    """The latest FINISHED run of each `tags.dvc_stage` × `tags.eval_protocol` (runs without a protocol tag:
    of each stage; ties broken by run id); runs without a stage tag are dropped."""
    if df.empty or "tags.dvc_stage" not in df:
        return df.iloc[0:0]
    done = df[(df.status == "FINISHED") & df["tags.dvc_stage"].notna()]
    keys = ["tags.dvc_stage"] + (["tags.eval_protocol"] if "tags.eval_protocol" in done else [])
    return done.sort_values(["start_time", "run_id"]).drop_duplicates(keys, keep="last")  # NaN keys count as equal


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    """Column `name` of a search_runs frame, or all None when no run logged it (search_runs omits the column)."""
    return df[name] if name in df else pd.Series([None] * len(df), index=df.index, dtype=object)


def stage_runs(uri: str, role: str) -> pd.DataFrame:
    """The latest FINISHED run per stage (and protocol) of one role ('evaluate', 'finetune'): run_id, stage,
    experiment, seed (int), start_time, the recorded params the analyses need (train_len, d_model, n_heads,
    rope_base, rope_type, t_max), and for evaluations protocol, primary (tag eval_primary; runs from before
    it existed are their stage's only protocol, so primary) and listed (params eval.protocols, as logged)."""
    df = latest_per_stage(runs(uri, role))
    cols = {"run_id": "run_id", "tags.dvc_stage": "stage", "tags.experiment": "experiment", "tags.seed": "seed",
            "start_time": "start_time", "params.model.train_len": "train_len", "params.model.d_model": "d_model",
            "params.model.n_heads": "n_heads", "params.model.rope_base": "rope_base",
            "params.exp.rope.type": "rope_type", "params.exp.rope.t_max": "t_max",
            "tags.eval_protocol": "protocol", "params.eval.protocols": "listed"}
    out = pd.DataFrame({new: _col(df, old) for old, new in cols.items()})
    out["seed"] = out.seed.astype(int)
    out["primary"] = _col(df, "tags.eval_primary").fillna("true").astype(str).str.lower().eq("true")
    return out.sort_values(["experiment", "seed"]).reset_index(drop=True)


def current_evaluations(evals: pd.DataFrame) -> pd.DataFrame:
    """The evaluation runs of the latest attempt per stage: the newest primary run of each stage, and the
    stage's runs of the other protocols that run lists in its `eval.protocols` param (a protocol dropped from
    eval.protocols since, or an earlier primary, no longer counts). `evals`: a stage_runs('evaluate') frame."""
    keep = []
    for _, g in evals.groupby("stage", sort=False):
        head = g[g.primary].sort_values(["start_time", "run_id"]).tail(1)
        if head.empty:
            continue
        listed = head.listed.iloc[0]
        names = set(ast.literal_eval(listed)) if isinstance(listed, str) else set(g.protocol)
        keep.append(pd.concat([head, g[~g.primary & g.protocol.isin(names - set(head.protocol))]]))
    return pd.concat(keep).sort_values(["experiment", "seed"]).reset_index(drop=True) if keep else evals.iloc[0:0]


# ---------------------------------------------------------------------------- PPL and passkey by length
def eval_frame(uri: str, protocol: str | None = None) -> pd.DataFrame:
    """One row per evaluation run × length: experiment, seed, protocol, length, ppl, val_ppl (when logged),
    passkey_acc, passkey_exact and depth<d> (passkey accuracy per needle depth; primary runs only), run_id,
    primary, train_len; read exactly as `clex report` reads them. `protocol`: None for each stage's primary
    protocol (what the notebooks show unless told otherwise), a protocol name for that one, ALL for every one."""
    evals = current_evaluations(stage_runs(uri, "evaluate"))
    if protocol is None:
        evals = evals[evals.primary]
    elif protocol != ALL:
        evals = evals[evals.protocol == protocol]
    c = _client(uri)
    records = []
    for r in evals.itertuples():
        values, tagged = report.run_values(c, r.run_id)
        lengths = sorted(values["ppl"])
        keys = [k for k in values if all(n in values[k] for n in lengths)]
        records += [{**row, "primary": r.primary, "train_len": int(r.train_len)}
                    for row in report.rows(r.experiment, r.seed, tagged, r.run_id, values, lengths, keys)]
    cols = ["experiment", "seed", "protocol", "length", "ppl", "val_ppl", "passkey_acc", "passkey_exact", "run_id",
            "primary", "train_len"]
    return pd.DataFrame(records, columns=None if records else cols)


def protocols_of(frame: pd.DataFrame) -> list[str]:
    """The protocols in an eval_frame, as the report orders them: the primary one first, then by name."""
    primary = sorted(set(frame[frame.primary].protocol))
    if len(primary) > 1:
        raise ValueError(f"runs name different primary protocols {primary}; the tables need one")
    rest = sorted(set(frame.protocol) - set(primary))
    return report.protocol_order(primary[0], rest) if primary else rest


def _client(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


def train_len(frame: pd.DataFrame) -> int:
    """The training length L the runs of `frame` recorded (one value, or a ValueError naming them all)."""
    return _one(frame, "train_len")


def rope_geometry(run_rows: pd.DataFrame) -> tuple[int, float, int]:
    """(head dim d, RoPE base b, training length L) the runs of a stage_runs frame recorded."""
    return _one(run_rows, "d_model") // _one(run_rows, "n_heads"), float(_one(run_rows, "rope_base", float)), \
        _one(run_rows, "train_len")


def _one(frame: pd.DataFrame, col: str, kind=int):
    values = sorted({kind(float(v)) for v in frame[col].dropna()})
    if len(values) != 1:
        raise ValueError(f"runs recorded {col} = {values}; the analysis needs exactly one value")
    return values[0]


def ppl_summary(frame: pd.DataFrame, col: str = "ppl") -> pd.DataFrame:
    """Mean and 95 % t-interval half-width of `col` over seeds per protocol × experiment × length
    (stats.mean_ci), with the seeds."""
    rows = [{"protocol": p, "experiment": e, "length": n, "mean": m, "half": h, "seeds": sorted(g.seed.tolist())}
            for (p, e, n), g in frame.groupby(["protocol", "experiment", "length"], sort=False)
            for m, h in [stats.mean_ci(g[col].tolist())]]
    return pd.DataFrame(rows)


def ablation_status(study: Study, evals: pd.DataFrame) -> pd.DataFrame:
    """Per ablation of ablations/*/ablation.yaml: its experiments, those with evaluation runs in the store,
    the missing ones, and status 'run', 'partial' or 'not run' (no experiment of it recorded)."""
    have = set(evals.experiment) if len(evals) else set()
    rows = []
    for name, ab in sorted(study.ablations.items()):
        present = [e for e in ab.experiments if e in have]
        missing = [e for e in ab.experiments if e not in have]
        status = NOT_RUN if not present else ("partial" if missing else "run")
        rows.append({"ablation": name, "status": status, "experiments": ab.experiments,
                     "present": present, "missing": missing})
    return pd.DataFrame(rows, columns=["ablation", "status", "experiments", "present", "missing"])


def ablation_frame(evals: pd.DataFrame, ab: Ablation) -> pd.DataFrame:
    """The evaluation rows of one ablation: the base model and the ablation's experiments that were recorded."""
    names = ["base"] + ab.experiments
    df = evals[evals.experiment.isin(names)].copy()
    df["experiment"] = pd.Categorical(df.experiment, [e for e in names if e in set(df.experiment)])
    return df.sort_values(["experiment", "seed", "length"]).assign(experiment=lambda d: d.experiment.astype(str))


def ablation_markdown(ab: Ablation, evals: pd.DataFrame) -> str:
    """One ablation as markdown, with clex/report.py's tables for every protocol in `evals` (primary first):
    test PPL by length (mean ± 95 % t-interval over seeds), the paper's numbers beside the protocol they were
    measured with, paired differences against the reference (t-interval and sign-flip p, over the seeds every
    recorded experiment has), validation PPL (when logged), and the MLflow run ids behind every number."""
    df = ablation_frame(evals, ab)
    present = [e for e in ab.experiments if e in set(df.experiment)]
    if not present:
        return f"## {ab.name}: {NOT_RUN}\n\nNo evaluation run of {ab.experiments} in the store."
    L, lengths = train_len(df), sorted(df.length.unique())
    names = [e for e in ["base"] + ab.experiments if e in set(df.experiment)]
    seeds = sorted(set.intersection(*(set(df[df.experiment == e].seed) for e in present)))
    ref = ab.reference or ab.experiments[0]
    protocols = protocols_of(df)
    missing = [e for e in ab.experiments if e not in present]
    md = [f"## {ab.name}", "", ab.question, "", f"Knob: `{ab.knob}`. Eval protocols: {', '.join(protocols)}; "
          f"L = {L}; seeds: " + "; ".join(f"{e} {sorted(df[df.experiment == e].seed.unique().tolist())}" for e in names)
          + ".", ""]
    if missing:
        md += [f"Not in the store (not run): {missing}.", ""]
    if ref not in present or not seeds:
        md += [f"No paired differences: the reference `{ref}` has no runs, or no seed is shared.", ""]
    md += report.statistics_note(len(seeds))
    view = ab.model_copy(update={"experiments": present if ref in present and seeds else [ref]})
    md += report.protocol_sections(df, view, names, lengths, seeds, L, protocols)
    md += ["", "### MLflow run ids", ""]
    md += report.run_lines(df, names, protocols)
    return "\n".join(md)


# ---------------------------------------------------------------------------- frequency basis (paper Figure 8)
def frequency_tables(uri: str, rope_type: str = "clex") -> dict[tuple[str, int], np.ndarray]:
    """{(experiment, seed): θ(t), shape (t_max, d/2), row k is t = k + 1} from the `frequencies.json` artifact
    of the latest FINISHED fine-tune run per stage of every experiment with `rope.type` = rope_type."""
    import mlflow

    fts = stage_runs(uri, "finetune")
    fts = fts[fts.rope_type == rope_type]
    mlflow.set_tracking_uri(uri)
    out = {}
    for r in fts.itertuples():
        with _env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):  # one bar per file would flood the notebook
            table = mlflow.artifacts.load_dict(f"runs:/{r.run_id}/frequencies.json")
        if table["t"] != list(range(1, len(table["t"]) + 1)):
            raise ValueError(f"run {r.run_id}: frequencies.json rows are t = {table['t']}, expected 1..t_max")
        out[(r.experiment, r.seed)] = np.asarray(table["inv_freq"], dtype=np.float64)
    return out


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def closed_forms(head_dim: int, base: float, train_len: int, t_max: int) -> dict[str, np.ndarray]:
    """θ(t) for t = 1..t_max of the fixed maps, shape (t_max, d/2), from clex/rope (never re-derived):
    NTK with α = 2t − 1 (base·(2t−1)^(d/(d−2)), docs/method.md §7), PI with s = t, YaRN with s = t."""
    from clex.rope.base import ntk_inv_freq
    from clex.rope.scaling import LinearScaling, yarn_inv_freq

    ts = range(1, t_max + 1)
    forms = {"NTK (α = 2t−1)": lambda t: ntk_inv_freq(head_dim, base, 2 * t - 1),
             "PI (s = t)": lambda t: LinearScaling(head_dim, base, train_len, t).inv_freq(),
             "YaRN (s = t)": lambda t: yarn_inv_freq(head_dim, base, train_len, t)}
    return {name: np.stack([f(t).double().numpy() for t in ts]) for name, f in forms.items()}


def log_ratio(table: np.ndarray) -> np.ndarray:
    """R[t, i] = ln θ_i(t) − ln θ_i(1) for t = 2..t_max (rows), pair index i (columns)."""
    logs = np.log(np.asarray(table, dtype=np.float64))
    return logs[1:] - logs[0]


def rank1_share(R: np.ndarray) -> float:
    """σ1² / Σσ² of R: 1 exactly when R[t, i] = c(t)·g(i), one profile shape over i scaled per t ("isotropic")."""
    s = np.linalg.svd(np.asarray(R, dtype=np.float64), compute_uv=False)
    return float(s[0] ** 2 / np.sum(s ** 2))


def profile_correlation(R: np.ndarray) -> float:
    """Mean pairwise Pearson correlation of the per-t profiles R[t, :]; nan when a profile is constant over i up
    to float32 rounding (PI: −ln t for every i, a shape Pearson cannot see) or there are fewer than two."""
    R = np.asarray(R, dtype=np.float64)
    if len(R) < 2 or np.any(R.std(axis=1) <= FLAT * np.abs(R).max(axis=1)):
        return float("nan")
    c = np.corrcoef(R)
    return float(np.mean([c[a, b] for a, b in itertools.combinations(range(len(R)), 2)]))


def isotropy(tables: dict) -> pd.DataFrame:
    """Per table (keys: a label, or (label, seed) as frequency_tables gives them), with R = log_ratio(θ):
    rank1_share of R (dominated by the large-t rows, where R is largest), rank1_share_rows of R with every
    row scaled to unit norm (each t weighs the same; 1 iff all profiles are parallel), profile_corr, and
    the t range covered (t_max)."""
    rows = []
    for key, table in tables.items():
        source, seed = key if isinstance(key, tuple) else (key, None)
        R = log_ratio(table)
        norms = np.linalg.norm(R, axis=1, keepdims=True)
        rows.append({"source": source, "seed": seed, "t_max": len(table), "rank1_share": rank1_share(R),
                     "rank1_share_rows": rank1_share(R / np.where(norms == 0, 1, norms)),
                     "profile_corr": profile_correlation(R)})
    return pd.DataFrame(rows, columns=["source", "seed", "t_max", "rank1_share", "rank1_share_rows", "profile_corr"])


def profile_frame(tables: dict, ts: list[int]) -> pd.DataFrame:
    """Long frame of R[t, i] for the chosen t: source, seed, t, i, log_ratio. Keys of `tables` are a label or
    (label, seed); t beyond a table's t_max is left out."""
    rows = []
    for key, table in tables.items():
        source, seed = key if isinstance(key, tuple) else (key, None)
        R = log_ratio(table)
        rows += [{"source": source, "seed": seed, "t": t, "i": i, "log_ratio": R[t - 2, i]}
                 for t in ts if 2 <= t <= len(table) for i in range(R.shape[1])]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- training curves (paper Figures 9/10)
def metric_history(uri: str, run_rows: pd.DataFrame, key: str, labels: tuple[str, ...] = ("experiment", "seed")
                   ) -> pd.DataFrame:
    """Long frame <labels>, step, value, run_id: the full MLflow history of metric `key` of every run in
    `run_rows` (a frame with a run_id column and the label columns)."""
    c = _client(uri)
    rows = [{**{k: getattr(r, k) for k in labels}, "step": int(m.step), "value": m.value, "run_id": r.run_id}
            for r in run_rows.itertuples() for m in c.get_metric_history(r.run_id, key)]
    return pd.DataFrame(rows, columns=[*labels, "step", "value", "run_id"]).sort_values(
        [*labels, "step"], ignore_index=True)


def curve_windows(curves: pd.DataFrame, k: int) -> pd.DataFrame:
    """Per experiment × seed: mean of the first k and of the last k logged values, and of all of them."""
    g = curves.sort_values("step").groupby(["experiment", "seed"])
    return pd.DataFrame({"first": g.value.apply(lambda v: v.head(k).mean()),
                         "last": g.value.apply(lambda v: v.tail(k).mean()), "all": g.value.mean()}).reset_index()


def steps_to_threshold(curves: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per experiment × seed, the first logged step whose value is <= threshold (nan if never reached)."""
    def first(g):
        hit = g[g.value <= threshold]
        return float(hit.step.min()) if len(hit) else float("nan")
    return curves.groupby(["experiment", "seed"]).apply(first, include_groups=False).rename("step").reset_index()


def paired_difference(per_seed: pd.DataFrame, a: str, b: str, cols: list[str]) -> pd.DataFrame:
    """For each column of `per_seed` (rows experiment × seed), the per-seed difference a − b over the seeds both
    have: mean, 95 % t-interval (ci_low, ci_high), exact sign-flip p and the smallest p those seeds allow
    (clex/stats.py), the seeds; empty when they share no seed."""
    x, y = (per_seed[per_seed.experiment == e].set_index("seed") for e in (a, b))
    seeds = sorted(set(x.index) & set(y.index))
    rows = []
    for col in cols if seeds else []:
        d = (x.loc[seeds, col] - y.loc[seeds, col]).tolist()
        r = stats.paired(d)
        rows.append({"quantity": col, "difference": f"{a} − {b}", "mean": r.mean, "ci_low": r.low,
                     "ci_high": r.high, "p": r.p, "min_p": r.min_p, "seeds": seeds, "per_seed": d})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- Optuna sweeps
def sweep_runs(uri: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(parents, trials) of every recorded sweep: parent runs have tags.role = 'sweep'; trials role = 'sweep_trial',
    nested under their parent (tags.mlflow.parentRunId). Both empty when no sweep was recorded."""
    return runs(uri, "sweep"), runs(uri, "sweep_trial")


def trial_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per trial (the latest run per sweep × trial_number, should a sweep have been restarted):
    sweep, trial_number, state, the searched params (ode_width, t_max, lr when searched), objective
    (complete trials only), run_id, parent_run_id."""
    cols = ["sweep", "trial_number", "state", "objective", "run_id", "parent_run_id"]
    if trials.empty:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame({"sweep": trials["tags.sweep"], "trial_number": trials["tags.trial_number"].astype(int),
                        "state": _col(trials, "tags.state"), "start_time": trials.start_time})
    searched = (c.removeprefix("params.trial.") for c in trials if c.startswith("params.trial."))
    for p in sorted(set(searched) - {"number"}):  # trial.number repeats the tag
        out[p] = pd.to_numeric(trials[f"params.trial.{p}"])
    out["objective"] = pd.to_numeric(_col(trials, "metrics.objective"))
    out["run_id"], out["parent_run_id"] = trials.run_id, _col(trials, "tags.mlflow.parentRunId")
    out = out.sort_values(["start_time", "run_id"]).drop_duplicates(["sweep", "trial_number"], keep="last")
    return out.drop(columns="start_time").sort_values(["sweep", "trial_number"], ignore_index=True)


def search_space(parent: pd.Series) -> dict:
    """Optuna distributions from a sweep parent's `space.<name>` params ("[low, high]"): integers give an
    IntDistribution, other numbers a FloatDistribution; both log-uniform, as clex sweep samples them."""
    import optuna

    space = {}
    for key in (k for k in parent.index if k.startswith("params.space.") and isinstance(parent[k], str)):
        low, high = ast.literal_eval(parent[key])  # str() of a Python list: "[1, 8]", "[1e-05, 0.01]"
        name = key.removeprefix("params.space.")
        if isinstance(low, int) and isinstance(high, int):
            space[name] = optuna.distributions.IntDistribution(low, high, log=low > 0)
        else:
            space[name] = optuna.distributions.FloatDistribution(float(low), float(high), log=low > 0)
    return space


def parameter_importances(parent: pd.Series, table: pd.DataFrame) -> tuple[dict[str, float] | None, str]:
    """fANOVA importances (optuna.importance.get_param_importances, seed 0) of the sweep's complete trials,
    rebuilt as an in-memory Optuna study from the MLflow rows; (None, why) when they cannot be computed
    (fewer than 2 complete trials, or no searched param that varies)."""
    import optuna

    space = search_space(parent)
    done = table[(table.state == "complete") & table.objective.notna()]
    varying = [p for p in space if p in done and done[p].nunique() > 1]
    if len(done) < 2 or not varying:
        return None, (f"skipped: {len(done)} complete trial(s) with an objective; importances need >= 2 "
                      f"with at least one searched param varying (varying: {varying})")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line for this scratch study
    try:
        study = optuna.create_study(direction="minimize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    for r in done.itertuples():
        params = {p: (int(getattr(r, p)) if isinstance(space[p], optuna.distributions.IntDistribution)
                      else float(getattr(r, p))) for p in space if p in done}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={p: space[p] for p in params},
                                                  value=float(r.objective)))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # deterministic; PED-ANOVA needs many trials
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return {p: float(v) for p, v in importances.items()}, f"{len(done)} complete trials"


# ---------------------------------------------------------------------------- figures
def save_figure(fig, figures: str | Path, name: str) -> Path:
    """Save `fig` as <figures>/<name>.png (folder created), show it when running in a notebook, close it.
    Names start with the notebook's number ('03_…'): `clex notebooks` replaces a rerun notebook's figures by that."""
    import matplotlib.pyplot as plt
    from IPython import get_ipython
    from IPython.display import display

    path = Path(figures) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    if get_ipython() is not None:
        display(fig)
    plt.close(fig)
    return path
