"""One definition of what a fine-tune depends on (`Study.finetune_inputs`): its resume key, its MLflow params and
the sweep's stored settings all come from it, so an eval or sweep setting never invalidates a fine-tune's
resume state; and `reuse:` is allowed only between experiments whose fine-tunes it says are the same."""
from __future__ import annotations

import json
import shutil

import mlflow
import pytest
import yaml

from clex import tracking
from clex.config import ParamsError, load_study
from clex.data import data_hash
from clex.train import finetune_hash
from conftest import make_study, run, tiny_params


def _study_with(tmp_path, name: str, edit) -> object:
    params = tiny_params()
    edit(params)
    return load_study(make_study(tmp_path / name, params))


def _hash(study, exp: str = "clex") -> str:
    return finetune_hash(study, study.experiment(exp), study.finetune_config(exp), 0, "data", "base")


def test_resume_hash_ignores_eval_and_sweep_settings_but_not_the_finetune(tmp_path):
    ref = _hash(_study_with(tmp_path, "ref", lambda p: None))

    def eval_and_sweep(p):
        p["eval"]["lengths"] = [32, 64]
        p["eval"]["protocols"] = ["nonoverlapping"]
        p["sweep"]["trials"] = 5

    assert _hash(_study_with(tmp_path, "eval", eval_and_sweep)) == ref
    assert _hash(_study_with(tmp_path, "lr", lambda p: p["finetune"].update(lr=0.002))) != ref
    assert _hash(_study_with(tmp_path, "trainer", lambda p: p["trainer"].update(gradient_clip_val=0.5))) != ref
    study = _study_with(tmp_path, "seed", lambda p: None)
    assert finetune_hash(study, study.experiment("clex"), study.finetune_config("clex"), 1, "data", "base") != ref


def test_finetune_run_records_its_inputs_and_resume_key(trained_study, tmp_path):
    """A real fine-tune: its MLflow params are the flattened finetune_inputs plus the run's own extras, its
    config_hash tag is finetune_hash of the study's data and base checkpoint."""
    study = tmp_path / "study"
    shutil.copytree(trained_study, study)  # a shared fixture: keep its store as other tests expect it
    run(study, "clex", "finetune", "naive_ft", "--seed", "1")
    s = load_study(study)
    info = json.loads((study / "build/finetune/naive_ft/seed1/run.json").read_text())
    r = mlflow.MlflowClient(f"sqlite:///{study / 'mlflow.db'}").get_run(info["run_id"])
    inputs = tracking.flatten(s.finetune_inputs("naive_ft"))
    assert {k: v for k, v in r.data.params.items() if k in inputs} == inputs
    assert set(r.data.params) - set(inputs) == {"seed", "n_params", "seq_len", "rope_lr_resolved", "rope_step_scale"}
    assert not any(k.startswith(("eval.", "sweep.", "data.", "pretrain.")) for k in r.data.params)
    base = json.loads((study / "build/base/run.json").read_text())["checkpoint_sha256"]
    exp = s.experiment("naive_ft")
    assert r.data.tags["config_hash"] == finetune_hash(s, exp, s.finetune_config("naive_ft"), 1,
                                                       data_hash(study / "build/data"), base)


def test_sweep_settings_are_the_swept_finetune_inputs(trained_study):
    from clex.sweep import settings, trial_optim

    s = load_study(trained_study)
    got = settings(s)
    assert {k: got[k] for k in s.finetune_inputs("clex")} == s.finetune_inputs("clex", trial_optim(s))
    assert set(got) - set(s.finetune_inputs("clex")) == {"sweep", "data_hash", "base_checkpoint_sha256",
                                                         "objective_protocol"}


def test_reuse_needs_the_same_training(tmp_path):
    """clex_attn_log_scale evaluates clex's checkpoints: the same fine-tune while N = L; another t_max, or a
    fine-tune at N = 2L (where the log scale acts), is refused naming the differing keys."""
    study = load_study(make_study(tmp_path / "ok"))
    assert study.checkpoint_of("clex_attn_log_scale") == "clex" and "clex_attn_log_scale" not in study.trained()
    assert study.training_difference("clex_attn_log_scale", "clex") == []
    bad = make_study(tmp_path / "tmax")
    path = bad / "experiments/clex_attn_log_scale.yaml"
    path.write_text(path.read_text() + "rope: {t_max: 8}\n")
    with pytest.raises(ParamsError, match=r"clex_attn_log_scale.yaml: reuse: 'clex' trains differently .*"
                                          r"exp.rope.t_max: 8 vs 16"):
        load_study(bad)
    params = tiny_params()
    params["finetune"]["seq_len_factor"] = 2
    (bad / "params.yaml").write_text(yaml.safe_dump(params))
    path.write_text(path.read_text().replace("rope: {t_max: 8}\n", ""))
    with pytest.raises(ParamsError, match=r"exp.attn_log_scale: True vs False"):
        load_study(bad)
