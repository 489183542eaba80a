"""`clex report` and clex/analysis.py on evaluation outputs in the two-protocol format (docs/protocols.md):
a real MLflow sqlite store in a temp folder, filled here with one evaluation run per protocol (tags and metrics
as clex/evaluate.py logs them) and the eval JSONs that name them. Every table cell is checked against numbers
computed another way: scipy's t interval, ttest_rel and exact permutation_test on the values logged here."""
from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.entities import Metric, Param, RunTag
from scipy import stats

from clex import analysis as A
from clex import tracking
from clex.config import load_study
from clex.report import VALIDATION_HEADING, build_report, protocol_sections
from conftest import REPO, tiny_params

ABLATION = "discrete_vs_continuous"
PROTOCOLS = ["progressive", "nonoverlapping"]  # primary first
SEEDS = [0, 1, 2, 3]
EXPERIMENTS = ["base", "naive_ft", "clex", "clex_discrete"]


def _values(rng, lengths, depths, primary: bool) -> dict:
    """Made-up evaluation metrics of one run: PPL rising with length, passkey accuracy in [0, 1]."""
    out = {"ppl": {n: float(5 + n / 32 * rng.uniform(0.5, 3)) for n in lengths},
           "val_ppl": {n: float(6 + n / 32 * rng.uniform(0.5, 3)) for n in lengths}}
    if primary:
        out |= {"passkey_acc": {n: float(rng.uniform()) for n in lengths},
                "passkey_exact": {n: float(rng.uniform()) for n in lengths}}
        out |= {f"depth{d}": {n: float(rng.uniform()) for n in lengths} for d in depths}
    return out


def _log_run(c, exp_id: str, experiment: str, seed: int, protocol: str, primary: bool, values: dict, L: int) -> str:
    """One evaluation run as clex/evaluate.py records it (the tags and metrics the report reads)."""
    stage = "evaluate_base" if experiment == "base" else tracking.stage_name("evaluate", experiment, seed)
    run = c.create_run(exp_id, run_name=stage, tags={
        "role": "evaluate", "experiment": experiment, "seed": str(seed), "dvc_stage": stage,
        "eval_protocol": protocol, "eval_primary": str(primary).lower()})
    metrics = []
    for key, by_length in values.items():
        if key.startswith("depth"):
            metrics += [Metric(f"passkey_acc_{n}_{key}", v, 0, 0) for n, v in by_length.items()]
        else:
            metrics += [Metric(key, v, 0, n) for n, v in by_length.items()]
            metrics += [Metric(f"{key}_{n}", v, 0, 0) for n, v in by_length.items() if key in ("ppl", "val_ppl")]
    c.log_batch(run.info.run_id, metrics=metrics, params=[Param("model.train_len", str(L)),
                                                          Param("eval.protocols", str(PROTOCOLS))])
    c.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(study, store uri, truth): truth[(protocol, experiment, seed)] = {"run_id", metric: {length: value}}."""
    root = tmp_path_factory.mktemp("report")
    for name in ("experiments", "ablations"):
        shutil.copytree(REPO / name, root / name)
    params = tiny_params()
    params["finetune"]["seeds"] = SEEDS
    params["eval"] = {"lengths": [32, 64, 128], "protocols": PROTOCOLS, "batch_size": 2}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        study = load_study(root)
        p = study.params
        L, lengths = p.model.train_len, p.eval.lengths
        c, exp_id = tracking.client(root), tracking.experiment_id(root)
        rng = np.random.default_rng(0)
        truth = {}
        for exp in EXPERIMENTS:
            for seed in [p.pretrain.seed] if exp == "base" else SEEDS:
                record = {"experiment": exp, "seed": seed, "primary": PROTOCOLS[0], "protocols": {}}
                for proto in reversed(PROTOCOLS):  # the JSON's order must not decide the tables' order
                    values = _values(rng, lengths, p.passkey.depths, proto == PROTOCOLS[0])
                    run_id = _log_run(c, exp_id, exp, seed, proto, proto == PROTOCOLS[0], values, L)
                    truth[(proto, exp, seed)] = {"run_id": run_id, **values}
                    record["protocols"][proto] = {"run_id": run_id, "ppl": {str(n): v for n, v in values["ppl"].items()},
                                                  "val_ppl": {str(n): v for n, v in values["val_ppl"].items()}}
                record |= {"run_id": record["protocols"][PROTOCOLS[0]]["run_id"], "protocol": PROTOCOLS[0]}
                path = root / "build" / "eval" / ("base.json" if exp == "base" else f"{exp}/seed{seed}.json")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record))
        out = build_report(study, ABLATION)
        yield study, uri, truth, out


def _section(table: str, protocol: str) -> str:
    """The text of one protocol's section of table.md."""
    start = table.index(f"## Protocol `{protocol}`")
    ends = [i for i in (table.find("\n## ", start + 1),) if i > 0]
    return table[start:min(ends) if ends else len(table)]


def _per_seed(truth, protocol, exp, key, n) -> np.ndarray:
    return np.array([truth[(protocol, exp, s)][key][n] for s in ([0] if exp == "base" else SEEDS)])


def _ci_cell(x: np.ndarray, digits: int = 2) -> str:
    if len(x) == 1:
        return f"{x.mean():.{digits}f}"
    lo, hi = stats.t.interval(0.95, df=len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    return f"{x.mean():.{digits}f} ± {(hi - lo) / 2:.{digits}f}"


def _row(label: str, cells) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def test_test_and_validation_tables_per_protocol_primary_first(store):
    study, _, truth, out = store
    table = (out / "table.md").read_text()
    lengths = study.params.eval.lengths
    assert table.index("## Protocol `progressive` (primary)") < table.index("## Protocol `nonoverlapping`") \
        < table.index("## Passkey retrieval")
    assert "Eval protocols: **progressive** (primary), nonoverlapping;" in table
    for proto in PROTOCOLS:
        test, val = _section(table, proto).split(VALIDATION_HEADING)
        for exp in EXPERIMENTS:
            label = "base (plain RoPE, no fine-tune)" if exp == "base" else exp
            assert _row(label, [_ci_cell(_per_seed(truth, proto, exp, "ppl", n)) for n in lengths]) in test, (proto, exp)
            assert _row(label, [_ci_cell(_per_seed(truth, proto, exp, "val_ppl", n)) for n in lengths]) in val
    assert "validation: use this to choose, never the test table" in VALIDATION_HEADING


def test_paired_differences_match_scipy(store):
    study, _, truth, out = store
    table = (out / "table.md").read_text()
    lengths = study.params.eval.lengths
    for proto in PROTOCOLS:
        paired = _section(table, proto).split("### Paired difference against `clex`")[1]
        for exp in ("naive_ft", "clex_discrete"):
            cells = []
            for n in lengths:
                x, y = _per_seed(truth, proto, exp, "ppl", n), _per_seed(truth, proto, "clex", "ppl", n)
                ci = stats.ttest_rel(x, y).confidence_interval(0.95)
                p = stats.permutation_test((x, y), lambda a, b, axis: np.mean(a - b, axis=axis), vectorized=True,
                                           permutation_type="samples", n_resamples=np.inf).pvalue
                cells.append(f"{np.mean(x - y):+.2f} [{ci.low:+.2f}, {ci.high:+.2f}] p {p:.3g}")
            assert _row(exp, cells) in paired.split(VALIDATION_HEADING)[0], (proto, exp)
    assert "with 4 seeds p cannot go below 0.125" in table


def test_statistics_wording(store):
    table = (store[3] / "table.md").read_text()
    for words in ("95 % Student-t interval (df = n − 1)", "roughly normal", "exact two-sided sign-flip test",
                  "all 2^n sign vectors", "symmetry", "the smallest possible p is 2/2^n: 0.25 at 3 seeds, 0.03125 at 6",
                  "here n = 4, so p >= 0.125", "Only seed-to-seed variation of the fine-tune is captured",
                  "docs/statistics.md"):
        assert words in table, words
    assert "bootstrap" not in table


def test_paper_numbers_only_beside_their_protocol(store):
    study, _, truth, out = store
    table = (out / "table.md").read_text()
    assert table.count("### The paper's numbers beside ours") == 1
    progressive = _section(table, "progressive")
    assert "### The paper's numbers beside ours" in progressive and "5.86 / " not in _section(table, "nonoverlapping")
    clex = [_per_seed(truth, "progressive", "clex", "ppl", n).mean() for n in study.params.eval.lengths]
    cells = [f"{p} / {o:.2f}" for p, o in zip(["5.86", "5.70", "5.87"], clex)] + ["14.53 / n/a", "30.51 / n/a"]
    assert _row("clex", cells) in progressive  # 8×L and 16×L: the tiny profile evaluates up to 4×L
    assert "| clex_discrete | 7.13 / " in progressive and progressive.count("— / n/a") == 2  # null: no paper value
    assert "| naive_ft |" not in progressive.split("### The paper's numbers")[1].split("###")[0]  # left out (16k)

    ab = study.ablation(ABLATION)
    other = ab.model_copy(update={"paper": ab.paper.model_copy(update={"protocol": "sliding"})})
    df = A.eval_frame(store[1], A.ALL)
    md = "\n".join(protocol_sections(df, other, EXPERIMENTS, study.params.eval.lengths, SEEDS, 32, PROTOCOLS))
    assert "The paper's numbers beside ours" not in md and "protocol `sliding`, which this evaluation did not run" in md


def test_passkey_once_from_the_primary_run(store):
    study, _, truth, out = store
    table = (out / "table.md").read_text()
    assert table.count("## Passkey retrieval") == 1 and "protocol `progressive`)" in table
    acc = [_ci_cell(_per_seed(truth, "progressive", "clex", "passkey_acc", n), 3) for n in study.params.eval.lengths]
    assert _row("clex", acc) in table.split("## Passkey retrieval")[1]


def test_outputs_and_report_run(store):
    study, uri, truth, out = store
    lengths = study.params.eval.lengths
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == set(EXPERIMENTS)
    assert set(metrics["clex"]) == {"ppl", "val_ppl", "passkey_acc"} and set(metrics["clex"]["ppl"]) == set(PROTOCOLS)
    for proto in PROTOCOLS:
        for key in ("ppl", "val_ppl"):
            assert metrics["clex"][key][proto] == {str(n): round(float(_per_seed(truth, proto, "clex", key, n).mean()), 4)
                                                   for n in lengths}
    csv = pd.read_csv(out / "ppl_by_length.csv")
    assert set(csv.protocol) == {"progressive"} and len(csv) == (1 + 3 * len(SEEDS)) * len(lengths)
    row = csv[(csv.experiment == "clex") & (csv.seed == 2) & (csv.length == 64)].iloc[0]
    assert row.ppl == truth[("progressive", "clex", 2)]["ppl"][64]
    assert (out / "ppl_vs_length.png").stat().st_size > 10_000

    table = (out / "table.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("- ") and "/seed" in line]
    assert lines == [f"- {p}/{e}/seed{s}: `{truth[(p, e, s)]['run_id']}`" for p in PROTOCOLS for e in EXPERIMENTS
                     for s in ([0] if e == "base" else SEEDS)]
    c = mlflow.MlflowClient(uri)
    (report,) = c.search_runs([c.get_experiment_by_name("clex-study").experiment_id], "tags.role = 'report'")
    assert report.data.tags["eval_protocol"] == "progressive,nonoverlapping"
    sources = {k.removeprefix("source_run."): v for k, v in report.data.params.items() if k.startswith("source_run.")}
    assert sources == {f"{p}/{e}/seed{s}": v["run_id"] for (p, e, s), v in truth.items()}


def test_inconsistent_eval_outputs_are_named(store):
    study, _, truth, _ = store
    path = study.root / "build/eval/clex/seed1.json"
    good = path.read_text()
    record = json.loads(good)
    try:
        swapped = dict(record, protocols={p: record["protocols"][q] for p, q in zip(PROTOCOLS, reversed(PROTOCOLS))})
        path.write_text(json.dumps(swapped))
        with pytest.raises(ValueError, match="tagged eval_protocol=nonoverlapping"):
            build_report(study, ABLATION)
        path.write_text(json.dumps(dict(record, protocols={"progressive": record["protocols"]["progressive"]})))
        with pytest.raises(ValueError, match=r"seed1.json: protocols \['progressive'\]"):
            build_report(study, ABLATION)
    finally:
        path.write_text(good)


def test_analysis_tables_equal_the_report(store):
    """ablation_markdown over every protocol's runs prints the report's protocol sections, byte for byte."""
    study, uri, truth, out = store
    evals = A.eval_frame(uri, A.ALL)
    assert len(evals) == 2 * (1 + 3 * len(SEEDS)) * len(study.params.eval.lengths)
    md = A.ablation_markdown(study.ablation(ABLATION), evals)
    table = (out / "table.md").read_text()
    ours = md[md.index("## Protocol"):md.index("\n\n### MLflow run ids")]
    assert ours == table[table.index("## Protocol"):table.index("\n\n## Passkey retrieval")]
    assert md[md.index("How to read"):md.index("\n\n## Protocol")] == \
        table[table.index("How to read"):table.index("\n\n## Protocol")]
    runs = md.split("### MLflow run ids")[1].strip().splitlines()
    assert runs == [line for line in table.splitlines() if line.startswith("- ") and "/seed" in line]


def test_eval_frame_primary_by_default(store):
    study, uri, truth, _ = store
    primary = A.eval_frame(uri)
    assert set(primary.protocol) == {"progressive"} and primary.primary.all()
    for r in primary.itertuples():
        t = truth[("progressive", r.experiment, r.seed)]
        assert (r.run_id, r.ppl, r.val_ppl, r.passkey_acc) == (t["run_id"], t["ppl"][r.length], t["val_ppl"][r.length],
                                                              t["passkey_acc"][r.length])
    other = A.eval_frame(uri, "nonoverlapping")
    assert set(other.protocol) == {"nonoverlapping"} and not other.primary.any()
    assert "passkey_acc" not in other or other.passkey_acc.isna().all()
    summary = A.ppl_summary(primary).set_index(["experiment", "length"])
    assert summary.loc[("clex", 32), "mean"] == pytest.approx(_per_seed(truth, "progressive", "clex", "ppl", 32).mean())


def test_current_evaluations_follow_the_latest_primary_run():
    """Per stage: the newest primary run and the other protocols it lists; an older primary protocol, a protocol
    dropped from eval.protocols and runs from before the eval_primary tag (primary, listing nothing) handled."""
    t = pd.Timestamp("2026-01-01")
    listed_both, listed_one = str(PROTOCOLS), str(PROTOCOLS[:1])
    df = pd.DataFrame([
        # stage a: a legacy run, then an attempt with both protocols
        ("a_legacy", "evaluate@clex-0", "nonoverlapping", True, None, 0),
        ("a_prog", "evaluate@clex-0", "progressive", True, listed_both, 1),
        ("a_non", "evaluate@clex-0", "nonoverlapping", False, listed_both, 1),
        # stage b: both protocols, then an attempt with progressive only
        ("b_prog_old", "evaluate@clex-1", "progressive", True, listed_both, 0),
        ("b_non_old", "evaluate@clex-1", "nonoverlapping", False, listed_both, 0),
        ("b_prog", "evaluate@clex-1", "progressive", True, listed_one, 1),
        # stage c: legacy only
        ("c_legacy", "evaluate@naive_ft-0", "nonoverlapping", True, None, 0),
    ], columns=["run_id", "stage", "protocol", "primary", "listed", "hours"])
    df["start_time"] = t + pd.to_timedelta(df.pop("hours"), unit="h")
    df["experiment"], df["seed"] = df.stage.str.extract(r"@(\w+)-")[0], df.stage.str[-1].astype(int)
    latest = df.sort_values("start_time").drop_duplicates(["stage", "protocol"], keep="last")  # latest_per_stage
    assert sorted(A.current_evaluations(latest).run_id) == ["a_non", "a_prog", "b_prog", "c_legacy"]
