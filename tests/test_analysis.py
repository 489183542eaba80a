"""clex/analysis.py and `clex notebooks` on the tiny study's real MLflow store (the `repro_study` fixture),
checked against references computed another way: the eval and fine-tune outputs under build/, the report's
table.md, MlflowClient histories, closed forms written out by hand, matrices of known rank."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from clex import analysis as A
from clex.config import Ablation, load_study
from conftest import run

D, BASE, L, T_MAX = 32, 10000.0, 128, 16  # the default profile's RoPE geometry
NOTEBOOKS = ["01_ablation_tables", "02_ppl_vs_length", "03_frequency_basis", "04_training_curves", "05_sweep"]


@pytest.fixture(scope="module")
def store(repro_study):
    study, _ = repro_study
    return study, f"sqlite:///{study / 'mlflow.db'}"


@pytest.fixture(scope="module")
def evals(store):
    return A.eval_frame(store[1])


# ---------------------------------------------------------------------------- PPL by length
def test_eval_frame_equals_eval_json(store, evals):
    study, _ = store
    records = [json.loads(p.read_text()) for p in (study / "build" / "eval").rglob("*.json")]
    assert len(records) == 7 and evals.run_id.nunique() == 7  # base + 3 experiments × 2 seeds
    for rec in records:
        rows = evals[(evals.experiment == rec["experiment"]) & (evals.seed == rec["seed"])].set_index("length")
        assert set(rows.run_id) == {rec["run_id"]}
        assert {int(n): v for n, v in rec["ppl"].items()} == rows.ppl.to_dict()
        assert {int(n): v["digit_acc"] for n, v in rec["passkey"].items()} == rows.passkey_acc.to_dict()
    assert sorted(evals.length.unique()) == [32, 64, 128] and set(evals.train_len) == {32}


def test_ablation_tables_match_report(store):
    study, uri = store
    table = (study / "reports" / "discrete_vs_continuous" / "table.md").read_text()
    protocols = load_study(study).params.eval.protocols
    md = A.ablation_markdown(load_study(study).ablation("discrete_vs_continuous"), A.eval_frame(uri, A.ALL))
    ppl_rows = [line for line in md.splitlines() if line.startswith("| ") and "±" in line]
    run_lines = [line for line in md.splitlines() if line.startswith("- ") and "/seed" in line]
    # naive_ft, clex, clex_discrete in the test and validation tables of every protocol; base + 6 runs per protocol
    assert len(ppl_rows) == 3 * 2 * len(protocols) and len(run_lines) == 7 * len(protocols)
    for line in ppl_rows + run_lines + md.split("### Paired difference")[1].splitlines()[:8]:
        assert line in table, line
    assert md[md.index("## Protocol"):md.index("\n\n### MLflow run ids")] in table  # every protocol's tables
    clex = [json.loads((study / "build" / "eval" / "clex" / f"seed{s}.json").read_text())["ppl"]["64"] for s in (0, 1)]
    assert f"{np.mean(clex):.2f} ± " in next(r for r in ppl_rows if r.startswith("| clex |"))


def test_ablation_status_and_not_run(store, evals):
    study = load_study(store[0])
    status = A.ablation_status(study, evals).set_index("ablation")
    assert status.loc["discrete_vs_continuous", "status"] == "run"
    assert status.loc["t_max", "status"] == "partial"
    assert status.loc["t_max", "missing"] == ["clex_tmax4", "clex_tmax8", "clex_tmax32"]
    assert set(A.ablation_status(study, evals[evals.experiment == "base"]).status) == {A.NOT_RUN}
    absent = Ablation(name="absent", question="q", knob="k", experiments=["pi", "ntk"])
    assert A.NOT_RUN in A.ablation_markdown(absent, evals)


def test_latest_finished_run_per_stage():
    t = pd.Timestamp("2026-01-01")
    df = pd.DataFrame({
        "run_id": ["old", "new", "failed_later", "other", "untagged"],
        "status": ["FINISHED", "FINISHED", "FAILED", "FINISHED", "FINISHED"],
        "start_time": [t, t + pd.Timedelta("1h"), t + pd.Timedelta("2h"), t, t],
        "tags.dvc_stage": ["evaluate@clex-0", "evaluate@clex-0", "evaluate@clex-0", "evaluate@clex-1", None]})
    assert sorted(A.latest_per_stage(df).run_id) == ["new", "other"]


# ---------------------------------------------------------------------------- frequency basis
def test_frequency_table_from_mlflow_equals_build_output(store):
    study, uri = store
    tables = A.frequency_tables(uri)
    assert sorted(tables) == [("clex", 0), ("clex", 1), ("clex_discrete", 0), ("clex_discrete", 1)]
    for exp, seed in tables:
        saved = json.loads((study / "build" / "finetune" / exp / f"seed{seed}" / "frequencies.json").read_text())
        np.testing.assert_array_equal(tables[(exp, seed)], np.asarray(saved["inv_freq"]))
        assert len(saved["t"]) == len(tables[(exp, seed)])


def test_closed_forms_against_their_formulas():
    forms = A.closed_forms(D, BASE, L, T_MAX)
    i, t = np.arange(D // 2), np.arange(2, T_MAX + 1)[:, None]
    ntk = -(2 * i / (D - 2)) * np.log(2 * t - 1)  # docs/method.md §7
    np.testing.assert_allclose(A.log_ratio(forms["NTK (α = 2t−1)"]), ntk, atol=1e-5)
    np.testing.assert_allclose(A.log_ratio(forms["PI (s = t)"]), -np.log(t) * np.ones(D // 2), atol=1e-5)
    yarn = A.log_ratio(forms["YaRN (s = t)"])  # 0 on the fast pairs, −ln s on the slow ones, a ramp between
    np.testing.assert_allclose(yarn[:, 0], 0, atol=1e-6)
    np.testing.assert_allclose(yarn[:, -1], -np.log(t[:, 0]), atol=1e-5)


@pytest.mark.parametrize("d, L_", [(D, L), (16, 32)])
def test_rank1_share_separates_isotropic_scaling(d, L_):
    iso = A.isotropy(A.closed_forms(d, BASE, L_, T_MAX)).set_index("source")
    for name in ("NTK (α = 2t−1)", "PI (s = t)"):
        assert abs(iso.loc[name, "rank1_share"] - 1) < 1e-9 and abs(iso.loc[name, "rank1_share_rows"] - 1) < 1e-9
    assert iso.loc["YaRN (s = t)", "rank1_share"] < 1 - 1e-5  # the ramp's share of θ/s depends on s
    assert iso.loc["NTK (α = 2t−1)", "profile_corr"] == pytest.approx(1, abs=1e-9)
    assert math.isnan(iso.loc["PI (s = t)", "profile_corr"])  # flat profiles: no Pearson correlation


def test_rank1_share_of_a_matrix_of_known_spectrum():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(15, 2)))
    v, _ = np.linalg.qr(rng.normal(size=(16, 2)))
    R = 3 * np.outer(u[:, 0], v[:, 0]) + 1 * np.outer(u[:, 1], v[:, 1])  # singular values 3 and 1
    assert A.rank1_share(R) == pytest.approx(9 / 10, abs=1e-12)
    assert A.profile_correlation(np.array([[1.0, 2, 3], [3, 2, 1], [2, 4, 6]])) == pytest.approx((-1 - 1 + 1) / 3)


# ---------------------------------------------------------------------------- training curves
def test_training_curves_equal_metric_history(store):
    study, uri = store
    fts = A.stage_runs(uri, "finetune")
    curves = A.metric_history(uri, fts, "train_loss")
    c = A._client(uri)
    for exp in ("naive_ft", "clex", "clex_discrete"):
        for seed in (0, 1):
            run_id = json.loads((study / "build" / "finetune" / exp / f"seed{seed}" / "run.json").read_text())["run_id"]
            mine = curves[(curves.experiment == exp) & (curves.seed == seed)]
            assert set(mine.run_id) == {run_id}
            ref = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "train_loss"))
            assert list(zip(mine.step, mine.value)) == ref and len(ref) == 3
    windows = A.curve_windows(curves, 2).set_index(["experiment", "seed"])
    first = curves[(curves.experiment == "clex") & (curves.seed == 1)].value.to_numpy()
    assert windows.loc[("clex", 1), "first"] == pytest.approx(first[:2].mean())
    assert windows.loc[("clex", 1), "last"] == pytest.approx(first[-2:].mean())
    diff = A.paired_difference(windows.reset_index(), "clex", "naive_ft", ["all"]).iloc[0]
    per_seed = [windows.loc[("clex", s), "all"] - windows.loc[("naive_ft", s), "all"] for s in (0, 1)]
    assert diff.seeds == [0, 1] and diff["mean"] == pytest.approx(np.mean(per_seed))
    assert A.paired_difference(windows.reset_index(), "clex", "clex_no_xi", ["all"]).empty


def test_steps_to_threshold():
    curves = pd.DataFrame({"experiment": ["a"] * 4 + ["b"] * 2, "seed": [0] * 6, "step": [0, 10, 20, 30, 0, 10],
                           "value": [5.0, 4.0, 2.9, 3.5, 5.0, 4.0]})
    hits = A.steps_to_threshold(curves, 3.0).set_index("experiment").step
    assert hits["a"] == 20 and math.isnan(hits["b"])


# ---------------------------------------------------------------------------- sweeps
def test_no_sweep_recorded(store):
    parents, trials = A.sweep_runs(store[1])
    assert parents.empty and trials.empty and A.trial_table(trials).empty


def test_importances_from_trial_rows():
    import optuna

    parent = pd.Series({"params.space.ode_width": "[1, 8]", "params.space.t_max": "[4, 32]",
                        "params.space.lr": "[1e-05, 0.01]"})
    space = A.search_space(parent)
    assert space["ode_width"] == optuna.distributions.IntDistribution(1, 8, log=True)
    assert space["lr"] == optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)
    table = pd.DataFrame({"state": ["complete"] * 4 + ["pruned"], "ode_width": [1, 2, 4, 8, 2],
                          "t_max": [4, 8, 16, 32, 4], "lr": [1e-3] * 5, "objective": [40.0, 30.0, 35.0, 50.0, None]})
    importances, _ = A.parameter_importances(parent, table)
    assert set(importances) == {"ode_width", "t_max", "lr"} and sum(importances.values()) == pytest.approx(1)
    skipped, why = A.parameter_importances(parent, table.iloc[[0, 4]])
    assert skipped is None and "1 complete" in why


# ---------------------------------------------------------------------------- clex notebooks
def test_notebooks_execute_on_the_tiny_store(store):
    study, _ = store
    run(study, "clex", "notebooks")
    out = study / "reports" / "analysis"
    assert sorted(p.stem for p in out.glob("*.ipynb")) == NOTEBOOKS
    assert sorted(json.loads((out / "timings.json").read_text())) == NOTEBOOKS
    for name in NOTEBOOKS:
        nb = nbformat.read(out / f"{name}.ipynb", as_version=4)
        assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    text = {n: (out / f"{n}.ipynb").read_text() for n in NOTEBOOKS}
    runs = A.eval_frame(f"sqlite:///{study / 'mlflow.db'}").run_id.unique()
    assert all(r in text["01_ablation_tables"] for r in runs)
    assert "no sweep recorded" in text["05_sweep"]
    for fig in ["02_ppl_vs_length_all", "02_ppl_vs_length_discrete_vs_continuous", "03_frequency_basis_clex",
                "03_frequency_basis_clex_discrete", "03_isotropy", "04_train_loss_all",
                "04_train_loss_discrete_vs_continuous"]:
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000, fig
    assert not (study / "build" / "analysis" / "staging").exists()


def test_unknown_notebook_is_a_params_error(store):
    proc = run(store[0], "clex", "notebooks", "nope", check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr and "03_frequency_basis" in proc.stderr


def _notebook(path: Path, code: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('root = "."\ntracking_uri = None\nfigures = "reports/analysis/figures"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_failing_notebook_fails_the_command_and_publishes_nothing(store, tmp_path):
    """In a copy of the study's configs with analysis/ = a good notebook and one that raises."""
    study = tmp_path / "study"
    for name in ("experiments", "ablations"):
        shutil.copytree(store[0] / name, study / name)
    shutil.copy(store[0] / "params.yaml", study / "params.yaml")
    (study / "analysis").mkdir()
    _notebook(study / "analysis" / "01_ok.ipynb", "from pathlib import Path\nimport matplotlib.pyplot as plt\n"
              "from clex import analysis as A\nfig, ax = plt.subplots()\nax.plot([1, 2])\n"
              "A.save_figure(fig, Path(root) / figures, '01_ok')")
    _notebook(study / "analysis" / "02_broken.ipynb", "x = 1\nraise ValueError('broken on purpose')")
    out = study / "reports" / "analysis"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "01_old.png").write_bytes(b"old")
    (out / "figures" / "03_other.png").write_bytes(b"other")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    proc = run(study, "clex", "notebooks", check=False)
    assert proc.returncode != 0
    assert "02_broken" in proc.stderr and "broken on purpose" in proc.stderr and "failed in cell [" in proc.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing published, nothing removed
    failed = study / "build" / "analysis" / "failed" / "02_broken.ipynb"
    assert "broken on purpose" in failed.read_text() and not (study / "build" / "analysis" / "staging").exists()

    run(study, "clex", "notebooks", "01_ok")  # one notebook replaces only its own outputs
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["01_ok.png", "03_other.png"]
    assert sorted(p.name for p in out.glob("*.ipynb")) == ["01_ok.ipynb"]
    assert list(json.loads((out / "timings.json").read_text())) == ["01_ok"]


def test_kernel_check_rejects_another_environments_kernelspec(tmp_path, monkeypatch):
    import sys

    from clex.notebooks import NotebookError, check_kernel

    check_kernel()  # this environment's spec (or a bare `python`, which jupyter_client runs as sys.executable)
    other = Path(sys.base_prefix) / "bin" / "python3"
    if sys.base_prefix == sys.prefix or not other.exists():
        pytest.skip("needs a virtual environment and its base interpreter")
    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": [str(other), "-m", "ipykernel_launcher", "-f",
                                                           "{connection_file}"], "display_name": "other",
                                                  "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))  # searched before the environment's own kernelspecs
    with pytest.raises(NotebookError, match="not this environment"):
        check_kernel()


def test_sweep_notebook_reads_a_real_sweep(store):
    """Last in this file (it adds a sweep to the shared store): `clex sweep` on the tiny study, then notebook 05."""
    import optuna

    study, uri = store
    run(study, "clex", "sweep")
    parents, trials = A.sweep_runs(uri)
    table = A.trial_table(trials)
    st = optuna.load_study(study_name="ode_width_tmax", storage=f"sqlite:///{study / 'build/sweeps/ode_width_tmax.db'}")
    assert list(table.trial_number) == [t.number for t in st.trials]
    assert table.objective.tolist() == pytest.approx([t.value for t in st.trials])  # tiny: no trial is pruned
    assert table.ode_width.tolist() == [t.params["ode_width"] for t in st.trials]
    run(study, "clex", "notebooks", "05_sweep")
    out = study / "reports" / "analysis"
    nb = nbformat.read(out / "05_sweep.ipynb", as_version=4)
    printed = json.dumps([o for c in nb.cells for o in c.get("outputs", [])])
    assert "no sweep recorded" not in printed and parents.run_id.iloc[0] in printed
    for fig in ("05_sweep_ode_width_tmax_objective", "05_sweep_ode_width_tmax_val_ppl"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000, fig
