"""dvc.yaml as DVC itself resolves it (its own API, the real templating): every stage reads and writes the paths
clex/layout.py names, the fine-tunes and the sweep track exactly `finetune_param_keys()`, and params.yaml edits
(a seed, a fine-tuned experiment) need no `clex pipeline`, while what DVC cannot express (a reuse evaluation,
an ablation) is refused by `clex validate` until it has run."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo

from clex import layout
from clex.config import finetune_param_keys, load_study
from conftest import REPO, make_study, run, tiny_params

R = Path(".")  # layout paths relative to the study root, as dvc.yaml writes them


def _resolved(root: Path) -> dict[str, dict]:
    """{stage name: {deps, params, outs}} of every stage, templates resolved by DVC."""
    with Repo(str(root)) as repo:
        return {s.name: {"deps": {d.def_path for d in s.deps if not isinstance(d, ParamsDependency)},
                         "params": [k for d in s.deps if isinstance(d, ParamsDependency) for k in d.params],
                         "outs": {o.def_path for o in s.outs}} for s in repo.index.stages}


def _p(path: Path) -> str:
    return str(path)


def test_stages_read_and_write_the_layout_paths(tmp_path):
    study = load_study(make_study(tmp_path / "study"))
    stages, p = _resolved(study.root), study.params
    seeds = p.finetune.seeds
    expected = {"validate": (set(), {layout.validated(R), layout.experiments_dir(R)}),
                "prepare": ({layout.validated(R)}, {layout.data_dir(R)}),
                "pretrain": ({layout.validated(R), layout.data_dir(R)}, {layout.base_dir(R)}),
                "evaluate_base": ({layout.base_dir(R), layout.data_dir(R)}, {layout.eval_path(R, "base", None)})}
    for e in study.trained():
        for s in seeds:
            expected[f"finetune@{e}-{s}"] = (
                {layout.validated(R), layout.data_dir(R), layout.base_dir(R), layout.experiment_json(R, e)},
                {layout.finetune_dir(R, e, s)})
    for e in study.evaluated():
        for s in seeds:
            expected[study.evaluate_stage(e, s)] = (
                {layout.finetune_dir(R, study.checkpoint_of(e), s), layout.experiment_json(R, e), layout.data_dir(R)},
                {layout.eval_path(R, e, s)})
    sweep = p.sweep.name
    expected[f"sweeps/{sweep}"] = (
        {layout.validated(R), layout.data_dir(R), layout.base_dir(R), layout.experiment_json(R, p.sweep.experiment)},
        {layout.sweep_report_dir(R, sweep) / f for f in ("best.yaml", "trials.csv", "metrics.json")}
        | {layout.sweep_db(R, sweep)})
    for name, ab in study.ablations.items():
        folder = layout.report_dir(R, name)
        expected[f"ablations/{name}"] = (
            {layout.eval_path(R, "base", None)} | {layout.eval_path(R, e, 0).parent for e in ab.experiments},
            {folder / f for f in ("table.md", "ppl_vs_length.png", "metrics.json", "ppl_by_length.csv")})
    expected["analysis"] = ({layout.report_dir(R, a) / "metrics.json" for a in study.ablations}
                            | {layout.sweep_report_dir(R, sweep) / "metrics.json"}, {layout.analysis_reports(R)})
    assert set(stages) == set(expected)
    for name, (deps, outs) in expected.items():
        assert {_p(d) for d in deps} <= stages[name]["deps"], name
        assert stages[name]["outs"] == {_p(o) for o in outs}, name
    for e in study.params.reuse_experiments:  # no fine-tune of its own, nothing read from its own folder
        assert not any(n.startswith(f"finetune@{e}-") for n in stages)
        assert not any(_p(layout.finetune_dir(R, e, s)) in v["deps"] for v in stages.values() for s in seeds)
    # ablation deps are exactly the evaluations it compares (and its own file, the base eval and the report's code)
    for name, ab in study.ablations.items():
        evals = {d for d in stages[f"ablations/{name}"]["deps"] if d.startswith("build/eval/") and d != "build/eval/base.json"}
        assert evals == {_p(layout.eval_path(R, e, 0).parent) for e in ab.experiments}, name


def test_finetunes_and_the_sweep_track_exactly_finetune_param_keys():
    stages, study = _resolved(REPO), load_study(REPO)
    keys = finetune_param_keys()
    finetunes = [n for n in stages if n.startswith("finetune@")]
    assert len(finetunes) == len(study.trained()) * len(study.params.finetune.seeds)
    for n in finetunes:
        assert stages[n]["params"] == keys, n
    sweep = stages[f"sweeps/{study.params.sweep.name}"]["params"]
    own = ["sweep", "eval.batch_size", "eval.protocols"]  # the sweep's keys, its validation batches, its objective protocol
    assert [k for k in sweep if k not in own] == keys and set(own) <= set(sweep)


def test_params_edits_need_no_regeneration_but_reuse_and_ablations_do(tmp_path):
    """A seed and a new fine-tuned experiment: params.yaml only, then `dvc repro` (validate passes, the matrices
    grow). A reuse experiment or an ablation: `clex validate` refuses until `clex pipeline` writes its stanza."""
    study = make_study(tmp_path / "study")
    params = tiny_params()
    params["finetune"]["seeds"] = [0, 1, 2]
    params["experiments"] = params["experiments"] + ["clex_new"]
    (study / "experiments/clex_new.yaml").write_text("extends: clex\nrope: {t_max: 8}\n")
    (study / "params.yaml").write_text(yaml.safe_dump(params))
    before = (study / "dvc.yaml").read_text()
    run(study, "clex", "pipeline", "--check")
    run(study, "clex", "validate")
    stages = _resolved(study)
    assert {"finetune@clex-2", "finetune@clex_new-0", "evaluate@clex_new-2", "evaluate_on_naive_ft@streaming-2"} <= set(stages)
    assert stages["finetune@clex_new-1"]["outs"] == {"build/finetune/clex_new/seed1"}

    (study / "experiments/clex_new_log.yaml").write_text("extends: clex_new\nattn_log_scale: true\nreuse: clex_new\n")
    params["reuse_experiments"] = params["reuse_experiments"] + ["clex_new_log"]
    (study / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run(study, "clex", "validate", check=False)
    assert proc.returncode == 2 and "dvc.yaml: out of date" in proc.stderr and "run `clex pipeline`" in proc.stderr
    assert run(study, "clex", "pipeline", "--check", check=False).returncode == 1
    run(study, "clex", "pipeline")
    after = (study / "dvc.yaml").read_text()
    assert after.split("# ---- GENERATED")[0] == before.split("# ---- GENERATED")[0]  # the hand-written part is kept
    assert "evaluate_on_clex_new@clex_new_log-2" in _resolved(study)
    assert "clex_new_log evaluate clex_new's checkpoints" in after  # each generated stanza says why

    (study / "ablations/new_ablation").mkdir()
    (study / "ablations/new_ablation/ablation.yaml").write_text(
        "question: q\nknob: k\nexperiments: [clex, clex_new_log]\n")
    assert "dvc.yaml: out of date" in run(study, "clex", "validate", check=False).stderr
    run(study, "clex", "pipeline")
    deps = _resolved(study)["ablations/new_ablation"]["deps"]
    assert {"build/eval/clex", "build/eval/clex_new_log"} <= deps and "build/eval/naive_ft" not in deps


@pytest.mark.parametrize("lists,words", [
    ({"experiments": ["naive_ft", "dynamic_ntk"], "reuse_experiments": []}, ["experiments: 'dynamic_ntk' reuses 'naive_ft'", "reuse_experiments"]),
    ({"experiments": ["naive_ft"], "reuse_experiments": ["clex"]}, ["reuse_experiments: 'clex' has no reuse:", "list it under experiments"]),
    ({"reuse_experiments": ["streaming", "streaming"]}, ["['streaming'] listed more than once"]),
    ({"experiments": ["clex"], "reuse_experiments": ["streaming"]},
     ["experiments/streaming.yaml: reuse: 'naive_ft' is not a fine-tuned experiment", "['clex']"]),
])
def test_experiment_lists_are_checked(tmp_path, lists, words):
    study = make_study(tmp_path / "study")
    params = tiny_params()
    params.update(lists)
    (study / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run(study, "clex", "validate", check=False)
    assert proc.returncode == 2
    for w in words:
        assert w in proc.stderr, proc.stderr
