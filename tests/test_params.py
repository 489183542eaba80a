"""Bad params stop `dvc repro` before any compute: one clear message, non-zero exit, no outputs."""
from __future__ import annotations

import pytest
import yaml

from clex.config import ParamsError, load_study
from conftest import REPO, make_study, run, tiny_params


def _set(d: dict, dotted: str, value) -> dict:
    *path, last = dotted.split(".")
    for k in path:
        d = d.setdefault(k, {})
    d[last] = value


BAD = [
    # (file, dotted key, bad value, words the message must contain)
    ("params.yaml", "experiments", ["naive_ft", "clexx"], ["experiments[1]", "'clexx'", "clex_discrete"]),
    ("experiments/clex.yaml", "rope.t_max", 0, ["rope.t_max", "got 0", "greater than or equal to 1"]),
    ("params.yaml", "eval.lengths", [32, 50], ["eval.lengths", "[50]", "multiples of 32"]),
    ("params.yaml", "data", {"source": "files", "files": "/nonexistent/corpus/*.txt"},
     ["data.files", "/nonexistent/corpus/*.txt", "matches no file"]),
    ("params.yaml", "data.vocab_size", 100, ["data.vocab_size", "got 100", "greater than or equal to 257"]),
    ("params.yaml", "eval.protocols", ["progressive", "strided"],
     ["eval.protocols.1", "'strided'", "'progressive', 'nonoverlapping' or 'sliding'"]),
    ("params.yaml", "eval.protocols", ["nonoverlapping", "nonoverlapping"], ["eval.protocols", "duplicates", "distinct"]),
    ("params.yaml", "passkey.depths", [0.5, 1.5], ["passkey.depths", "[0.5, 1.5]", "fractions in [0, 1]"]),
    ("ablations/discrete_vs_continuous/ablation.yaml", "paper.protocol", "chunked",
     ["paper.protocol", "'chunked'", "'progressive', 'nonoverlapping' or 'sliding'"]),
    ("experiments/clex.yaml", "reuse", "naive_ft", ["params.yaml: experiments: 'clex' reuses 'naive_ft'",
                                                     "list it under reuse_experiments"]),
    ("experiments/dynamic_ntk.yaml", "reuse", "clex", ["reuse: 'clex' trains differently", "exp.rope.type: 'rope' vs 'clex'",
                                                       "finetune.accumulate: 1 vs 4"]),
    ("experiments/streaming.yaml", "reuse", "pi", ["reuse: 'pi' trains differently", "exp.rope.type: 'rope' vs 'pi'"]),
    ("experiments/clex_attn_log_scale.yaml", "position_sampling", "uniform",
     ["reuse: 'clex' trains differently", "exp.position_sampling: 'uniform' vs 'random'"]),
    ("params.yaml", "sweep.t_max", [8, 4], ["sweep.t_max", "[8, 4]", "[low, high]"]),
    ("params.yaml", "sweep.experiment", "pi", ["sweep.experiment", "'pi'", "not a CLEX experiment", "clex_discrete"]),
    ("params.yaml", "sweep.val_every_n_steps", 2, ["sweep.val_every_n_steps", "does not divide finetune.steps=3"]),
]


@pytest.mark.parametrize("file,key,value,words", BAD, ids=[b[1] for b in BAD])
def test_bad_params_stop_the_pipeline_before_compute(tmp_path, file, key, value, words):
    study = make_study(tmp_path / "study")
    if file == "params.yaml":
        params = tiny_params()
        _set(params, key, value)
        (study / file).write_text(yaml.safe_dump(params))
    else:
        exp = yaml.safe_load((study / file).read_text())
        _set(exp, key, value)
        (study / file).write_text(yaml.safe_dump(exp))
    proc = run(study, "dvc", "repro", "ablations/discrete_vs_continuous", check=False)
    assert proc.returncode != 0
    message = proc.stderr + proc.stdout
    assert "invalid parameters" in message
    for w in words:
        assert w in message, f"{w!r} missing from:\n{message}"
    assert not (study / "build").exists() or not any((study / "build").rglob("*")), "outputs were written"
    assert not (study / "reports").exists()
    assert not (study / "mlflow.db").exists()


def test_repo_study_is_valid_and_dvc_yaml_in_sync():
    study = load_study(REPO)
    assert set(study.params.experiments) <= set(study.experiments)
    assert "discrete_vs_continuous" in study.ablations
    run(REPO, "clex", "pipeline", "--check")


def test_unknown_key_is_rejected(tmp_path):
    study = make_study(tmp_path / "study")
    params = tiny_params()
    params["model"]["n_layer"] = 2  # typo of n_layers must not silently fall back to the default
    (study / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run(study, "clex", "validate", check=False)
    assert proc.returncode == 2
    assert "model.n_layer" in proc.stderr and "Extra inputs are not permitted" in proc.stderr


def test_key_tracked_by_dvc_must_be_spelled_out(tmp_path):
    study = make_study(tmp_path / "study")
    params = tiny_params()
    del params["trainer"]["devices"], params["model"]["init_std"]  # pydantic has defaults; DVC would refuse later
    (study / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run(study, "dvc", "repro", "ablations/discrete_vs_continuous", check=False)
    assert proc.returncode != 0 and "model.init_std, trainer.devices: missing" in proc.stderr + proc.stdout
    assert not (study / "build" / "data").exists()


def test_dvc_graph_has_every_ablation_stage():
    listed = run(REPO, "dvc", "stage", "list").stdout
    names = {line.split()[0] for line in listed.splitlines() if line.strip()}
    study = load_study(REPO)
    assert {f"ablations/{a}" for a in study.ablations} <= names
    assert {"constant_term", "t_scale", "attention_log_scale", "position_sampling", "t_max", "baselines",
            "discrete_vs_continuous"} <= set(study.ablations)
    for a in study.ablations:
        assert (REPO / "ablations" / a / "README.md").is_file(), a
    seeds = study.params.finetune.seeds
    assert {f"finetune@{e}-{s}" for e in study.trained() for s in seeds} <= names
    assert {f"evaluate@{e}-{s}" for e in study.trained() for s in seeds} <= names
    assert {f"evaluate_on_naive_ft@{e}-{s}" for e in ("dynamic_ntk", "streaming") for s in seeds} <= names
    assert {f"evaluate_on_clex@clex_attn_log_scale-{s}" for s in seeds} <= names
    assert not {n for n in names if n.startswith(("finetune@dynamic_ntk", "finetune@streaming",
                                                  "finetune@clex_attn_log_scale"))}  # they reuse naive_ft's, clex's
    assert f"sweeps/{study.params.sweep.name}" in names and "analysis" in names
    analysis = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["analysis"]
    assert {f"reports/{a}/metrics.json" for a in study.ablations} <= set(analysis["deps"])  # every ablation feeds it


def test_experiment_extends_merges_and_rejects_bad_parents(tmp_path):
    study = make_study(tmp_path / "study")
    s = load_study(study)
    no_xi, clex = s.experiments["clex_no_xi"], s.experiments["clex"]
    assert no_xi.rope.constant_term is False
    assert no_xi.model_dump(exclude={"name", "description", "rope"}) == clex.model_dump(exclude={"name", "description", "rope"})
    assert no_xi.rope.model_dump(exclude={"constant_term"}) == clex.rope.model_dump(exclude={"constant_term"})
    (study / "experiments/bad.yaml").write_text("extends: clexx\n")
    with pytest.raises(ParamsError, match=r"experiments/bad.yaml: extends: got 'clexx'; allowed: one of \[.*'clex'"):
        load_study(study)
    (study / "experiments/bad.yaml").write_text("extends: bad2\n")
    (study / "experiments/bad2.yaml").write_text("extends: bad\n")
    with pytest.raises(ParamsError, match="makes a cycle"):
        load_study(study)


def test_stale_dvc_yaml_is_refused_before_compute(tmp_path):
    """dvc.yaml's generated part lists each ablation's experiments: an ablation change without `clex pipeline`
    stops at validate. (A seed or a fine-tuned experiment needs no regeneration: tests/test_dvc_yaml.py.)"""
    study = make_study(tmp_path / "study")
    ablation = study / "ablations/discrete_vs_continuous/ablation.yaml"
    ablation.write_text(ablation.read_text().replace("experiments: [naive_ft, clex, clex_discrete]",
                                                     "experiments: [naive_ft, clex, clex_discrete, pi]"))
    proc = run(study, "dvc", "repro", "ablations/discrete_vs_continuous", check=False)
    assert proc.returncode != 0 and "dvc.yaml: out of date" in proc.stderr + proc.stdout
    assert "run `clex pipeline`" in proc.stderr + proc.stdout
    assert not (study / "build" / "data").exists()
    run(study, "clex", "pipeline")
    assert "build/eval/pi" in yaml.safe_load((study / "dvc.yaml").read_text())["stages"]["ablations/discrete_vs_continuous"]["deps"]
