"""Optuna sweeps over CLEX's ODE width λ and t_max (`clex sweep`, DVC stage `sweeps/<name>`).

Each trial fine-tunes `sweep.experiment` with the trial's λ and t_max from the shared base model, with
that experiment's fine-tune settings (params.yaml `finetune` and its `finetune:` overrides), and scores the mean
validation PPL at `sweep.val_multipliers` × L on validation documents (never the test set), each window run as
the primary evaluation protocol (`eval.protocols[0]`, the official `progressive` by default) runs it. That value
is reported every `sweep.val_every_n_steps` steps, so Optuna's MedianPruner stops trials that fall behind.

The study lives in an RDB storage: a sqlite file under build/sweeps/ by default, any database URL by
param. Rerunning the command continues the same study up to `sweep.trials` finished trials; several
workers (`sweep.workers`, or more `clex sweep` commands on the same storage) share it: sqlite waits on
a locked database instead of failing, trials send heartbeats, and a trial whose worker died is marked
failed and retried with the same parameters. A study whose settings differ from the params is refused.

MLflow: the study is one parent run (tags role=sweep, sweep, optuna_study, optuna_storage); each trial
is a run nested under it (role=sweep_trial, trial_number, state = complete | pruned | failed) with its
λ and t_max as `trial.*` params, `val_ppl` by step (the intermediate objective) and `objective`.
Outputs in reports/sweeps/<name>/: best.yaml (the best trial as an experiment YAML), trials.csv, metrics.json.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
import warnings
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from clex import layout, tracking
from clex.config import Experiment, FinetuneConfig, ParamsError, Study, load_study
from clex.data import data_hash, load_tokens
from clex.io import staged_files

HEARTBEAT_S, GRACE_S = 5, 20  # a trial without a heartbeat for GRACE_S seconds is failed and retried once
SQLITE_BUSY_TIMEOUT_S = 600  # writers wait for a locked sqlite database instead of failing
MAX_CONSECUTIVE_FAILURES = 3
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


class StepPruning(PyTorchLightningPruningCallback):
    """optuna-integration's pruning callback reports at the epoch, but a fine-tune here is one epoch of
    `steps` steps: report at the global step, and never prune the final report (that trial is done)."""

    def on_validation_end(self, trainer, pl_module) -> None:
        score = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or score is None:
            return
        self._trial.report(score.item(), step=trainer.global_step)
        if trainer.global_step < trainer.max_steps and self._trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {trainer.global_step} ({self.monitor} {score.item():.3f})")


def trial_stage(sweep: str, number: int) -> str:
    """A trial's stage name: its MLflow run name and resume folder build/resume/<stage>."""
    return f"sweeps/{sweep}/trial{number}"


def storage_url(study: Study) -> str:
    cfg = study.params.sweep
    return cfg.storage or f"sqlite:///{layout.sweep_db(study.root, cfg.name)}"


def _storage(study: Study, root: Path) -> optuna.storages.RDBStorage:
    url = storage_url(study)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if url.startswith("sqlite") else {}
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats

    def stale(study_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A trial whose worker died: close its MLflow run and drop its resume folder (the retry is another trial,
        trained from the start), then queue it again with the same parameters."""
        _close_trial_run(root, study_.study_name, trial.number, "failed", "KILLED")
        shutil.rmtree(layout.resume_dir(root, trial_stage(study_.study_name, trial.number)), ignore_errors=True)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study_, trial)

    for attempt in range(3):  # several workers creating the tables of a new database at once
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S, heartbeat_stale_trial_callback=stale)
        except Exception:
            if attempt == 2:
                raise
            time.sleep(1 + attempt)


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def settings(study: Study) -> dict:
    """Everything a trial's result depends on: the swept experiment's fine-tune inputs (Study.finetune_inputs,
    with the trials' optimiser), the sweep's own keys, data, base checkpoint and objective protocol. A stored
    study with other settings is refused."""
    p = study.params
    base = json.loads((layout.base_dir(study.root) / "run.json").read_text())["checkpoint_sha256"]
    return {**study.finetune_inputs(p.sweep.experiment, trial_optim(study)),
            "sweep": p.sweep.model_dump(exclude={"trials", "storage", "workers"}),
            "data_hash": data_hash(layout.data_dir(study.root)), "base_checkpoint_sha256": base,
            "objective_protocol": p.eval.protocols[0]}


def check_data(study: Study) -> None:
    """Before any compute: the validation stream holds a window of the longest objective length."""
    from clex.passkey import passkey_format

    p = study.params
    longest = max(p.sweep.val_multipliers) * p.model.train_len
    size = load_tokens(layout.data_dir(study.root), "val").size
    if size <= longest + 1:
        raise ParamsError(f"sweep.val_multipliers: {p.sweep.val_multipliers} needs validation windows of {longest + 1} "
                          f"tokens, but the validation split has {size}; allowed: smaller multipliers or more "
                          "validation data (data.val_fraction)")
    if p.passkey.train_fraction > 0:
        passkey_format(study, p.model.train_len * trial_optim(study).seq_len_factor + 1, "the fine-tuning length")


def _sampler(study: Study, seed: int) -> optuna.samplers.BaseSampler:
    cfg = study.params.sweep
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(n_startup_trials=cfg.startup_trials, constant_liar=True, seed=seed)


def open_study(study: Study, worker: int = 0) -> tuple[optuna.Study, str]:
    """Create or load the Optuna study and its MLflow parent run; returns (study, parent run id).

    Exactly one process creates the study (the storage's unique study name decides); it records the
    settings and the parent run id as study attributes, which every other worker and every rerun reads.
    """
    cfg, root = study.params.sweep, study.root
    storage = _storage(study, root)
    wanted = settings(study)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.prune_after_steps)
    try:
        st = optuna.create_study(study_name=cfg.name, storage=storage, direction="minimize", pruner=pruner,
                                 sampler=_sampler(study, cfg.seed))
        st.set_user_attr("settings", wanted)
        st.set_user_attr("mlflow_run_id", _create_parent_run(study))
    except optuna.exceptions.DuplicatedStudyError:
        st = optuna.load_study(study_name=cfg.name, storage=storage, pruner=pruner, sampler=_sampler(study, cfg.seed))
    deadline = time.time() + 60
    while "mlflow_run_id" not in st.user_attrs:  # another worker is creating it right now
        if time.time() > deadline:
            raise RuntimeError(f"study {cfg.name!r} in {_redacted(storage_url(study))} has no MLflow parent run")
        time.sleep(0.5)
    stored = st.user_attrs["settings"]
    if stored != wanted:
        changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise ParamsError(
            f"sweep.name: {cfg.name!r} already holds a study in {_redacted(storage_url(study))} with other "
            f"settings ({', '.join(changed)} differ); allowed: the same settings (only sweep.trials, sweep.workers "
            "and sweep.storage may change), a new sweep.name, or deleting that study")
    # a fresh seed per worker and per resumption: no two workers draw the same random start-up trials
    st.sampler = _sampler(study, cfg.seed * 1_000_003 + 7919 * len(st.trials) + worker)
    return st, st.user_attrs["mlflow_run_id"]


def _create_parent_run(study: Study) -> str:
    """The sweep's MLflow run (RUNNING until `write_outputs` closes it); the trials' runs nest under it."""
    cfg, root = study.params.sweep, study.root
    stage = f"sweeps/{cfg.name}"
    tags = tracking.run_tags(root, stage, "sweep", sweep=cfg.name, optuna_study=cfg.name,
                             optuna_storage=_redacted(storage_url(study)), experiment=cfg.experiment, seed=cfg.seed,
                             data_hash=data_hash(layout.data_dir(root)))
    space = {"space.ode_width": str(cfg.ode_width), "space.t_max": str(cfg.t_max)}
    if cfg.lr is not None:
        space["space.lr"] = str(cfg.lr)
    params = {**tracking.flatten(cfg.model_dump(exclude={"storage"}), "sweep."),
              **tracking.flatten(trial_optim(study).model_dump(), "finetune."), **space}
    return tracking.start_run(root, stage, tags, params)


def _trial_run_id(root: Path, sweep: str, number: int) -> str | None:
    runs = tracking.client(root).search_runs(
        [tracking.experiment_id(root)], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.sweep = '{sweep}' and tags.role = 'sweep_trial' and tags.trial_number = '{number}'")
    return runs[0].info.run_id if runs else None


def _close_trial_run(root: Path, sweep: str, number: int, state: str, status: str) -> str | None:
    """Tag a trial's MLflow run with its final state and end it; returns its id (None if it was never created)."""
    run_id = _trial_run_id(root, sweep, number)
    if run_id is not None:
        c = tracking.client(root)
        c.set_tag(run_id, "state", state)
        c.set_terminated(run_id, status=status)
    return run_id


def trial_optim(study: Study) -> FinetuneConfig:
    """The trials' fine-tune settings: the swept experiment's (params.yaml `finetune` with its overrides)."""
    return study.finetune_config(study.params.sweep.experiment)


def trial_experiment(study: Study, number: int, ode_width: int, t_max: int) -> Experiment:
    """The swept experiment with a trial's λ and t_max, validated like any experiment file."""
    exp = study.experiment(study.params.sweep.experiment)
    data = exp.model_dump()
    data.update(name=f"{exp.name}_trial{number}", rope={**data["rope"], "ode_width": ode_width, "t_max": t_max})
    return Experiment.model_validate(data)


def objective(study: Study, parent: str):
    """The function Optuna calls per trial: fine-tune with the trial's λ and t_max, return the objective."""
    from clex.train import RunSpec, train

    p, cfg, root = study.params, study.params.sweep, study.root

    def run(trial: optuna.Trial) -> float:
        ode_width = trial.suggest_int("ode_width", *cfg.ode_width, log=True)
        t_max = trial.suggest_int("t_max", *cfg.t_max, log=True)
        optim = trial_optim(study)
        if cfg.lr is not None:
            optim = optim.model_copy(update={"lr": trial.suggest_float("lr", *cfg.lr, log=True)})
        stage = trial_stage(cfg.name, trial.number)
        spec = RunSpec(
            stage=stage, out_dir=layout.sweep_dir(root, cfg.name) / f"trial{trial.number}", optim=optim,
            val_lengths=[m * p.model.train_len for m in cfg.val_multipliers], val_windows=cfg.val_windows,
            val_batch_size=p.eval.batch_size, val_protocol=p.eval.protocols[0], val_every_n_steps=cfg.val_every_n_steps,
            role="sweep_trial", parent=parent,
            tags={"sweep": cfg.name, "trial_number": str(trial.number), "state": "running", "ablations": ""},
            params={"trial.number": trial.number, "objective_protocol": p.eval.protocols[0],
                    **{f"trial.{k}": v for k, v in trial.params.items()}},
            callbacks=[StepPruning(trial, monitor="val_ppl")])
        try:
            out = train(study, trial_experiment(study, trial.number, ode_width, t_max), cfg.seed, spec)
        except BaseException as e:
            state, status = ("pruned", "FINISHED") if isinstance(e, optuna.TrialPruned) else ("failed", "FAILED")
            run_id = _close_trial_run(root, cfg.name, trial.number, state, status)
            if run_id is not None:
                trial.set_user_attr("mlflow_run_id", run_id)
            raise
        finally:
            shutil.rmtree(layout.resume_dir(root, stage), ignore_errors=True)
        info = json.loads((out / "run.json").read_text())
        value = info["metrics"]["val_ppl"]
        c = tracking.client(root)
        c.log_metric(info["run_id"], "objective", value)
        c.set_tag(info["run_id"], "state", "complete")
        trial.set_user_attr("mlflow_run_id", info["run_id"])
        return value

    return run


def work(study: Study, st: optuna.Study, parent: str) -> None:
    """One worker on an opened study: run trials until it holds `sweep.trials` finished ones.

    A worker whose peers are still running the last trials waits for them, so it can take over a trial
    that fails or whose worker dies (its heartbeat stops; it is then queued again, WAITING).
    """
    cfg = study.params.sweep
    run = objective(study, parent)
    failures = 0
    while True:
        optuna.storages.fail_stale_trials(st)
        trials = st.get_trials(deepcopy=False)
        done = sum(t.state in DONE for t in trials)
        if done >= cfg.trials:
            return
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and done + sum(t.state == TrialState.RUNNING for t in trials) >= cfg.trials:
            time.sleep(HEARTBEAT_S / 2)
            continue
        before = len(trials)
        st.optimize(run, n_trials=1, catch=(Exception,), gc_after_trial=True)
        mine = [t for t in st.get_trials(deepcopy=False)[before:] if t.state == TrialState.FAIL]
        failures = failures + 1 if mine else 0
        if failures >= MAX_CONSECUTIVE_FAILURES:
            reason = mine[-1].system_attrs.get("fail_reason", "see the log above")
            raise RuntimeError(f"sweep {cfg.name!r}: {failures} trials in a row failed; the last: {reason}")


def _spawned_worker(root: str, worker: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    study = load_study(Path(root))
    work(study, *open_study(study, worker))


def run_sweep(study: Study, workers: int | None = None) -> Path:
    """`clex sweep`: run the study to `sweep.trials` finished trials with `workers` processes, then write
    reports/sweeps/<name>/ and close the parent run. Returns the report folder."""
    workers = workers or study.params.sweep.workers
    if workers < 1:
        raise ParamsError(f"--workers: {workers}; allowed: an integer >= 1")
    if study.params.trainer.devices not in (1, "auto") or study.params.trainer.num_nodes != 1:
        raise ParamsError(f"trainer.devices: {study.params.trainer.devices} (num_nodes {study.params.trainer.num_nodes});"
                          " allowed for a sweep: 1 (one process per trial; parallelise with sweep.workers)")
    check_data(study)
    st, parent = open_study(study)
    tracking.client(study.root).update_run(parent, status="RUNNING")
    if workers == 1:
        work(study, st, parent)
    else:
        import torch

        ctx = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // workers)
        gpus = torch.cuda.device_count() if "CUDA_VISIBLE_DEVICES" not in os.environ else 0
        procs = [ctx.Process(target=_spawned_worker, args=(str(study.root), i, threads)) for i in range(workers)]
        for i, proc in enumerate(procs):
            if gpus > 1:  # one GPU per worker, round robin (the environment is copied when the process starts)
                os.environ["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
            proc.start()
        if gpus > 1:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        for proc in procs:
            proc.join()
        failed = [i for i, proc in enumerate(procs) if proc.exitcode]
        if failed:
            raise RuntimeError(f"sweep workers {failed} exited with an error (see above)")
    return write_outputs(study, st, parent)


def trials_frame(st: optuna.Study):
    """One row per trial: number, state, parameters, value (for a pruned trial: its last reported
    intermediate value, Optuna's convention), last reported step, seconds, MLflow run."""
    import pandas as pd

    rows = []
    for t in st.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append({"number": t.number, "state": t.state.name.lower(), **t.params, "value": t.value,
                     "last_step": t.last_step, "seconds": seconds, "mlflow_run_id": t.user_attrs.get("mlflow_run_id")})
    return pd.DataFrame(rows)


def write_outputs(study: Study, st: optuna.Study, parent: str) -> Path:
    """best.yaml, trials.csv and metrics.json (atomically) and the parent run's summary."""
    cfg, root = study.params.sweep, study.root
    frame = trials_frame(st)
    complete = frame[frame.state == "complete"]
    if complete.empty:
        raise RuntimeError(f"sweep {cfg.name!r}: no trial completed ({frame.state.value_counts().to_dict()})")
    best = st.best_trial
    counts = {s: int((frame.state == s).sum()) for s in ("complete", "pruned", "fail")}
    metrics = {"best_value": best.value, "best_trial": best.number, "best_params": best.params,
               "trials_complete": counts["complete"], "trials_pruned": counts["pruned"], "trials_failed": counts["fail"],
               "pruned_share": round(counts["pruned"] / max(1, counts["complete"] + counts["pruned"]), 4),
               "mean_seconds_complete": round(float(complete.seconds.mean()), 2),
               "mean_seconds_pruned": round(float(frame[frame.state == "pruned"].seconds.mean()), 2)
               if counts["pruned"] else None}
    out = layout.sweep_report_dir(root, cfg.name)
    with staged_files(out) as tmp:  # files move into place only once all exist (DVC keeps a .gitignore in out)
        (tmp / "best.yaml").write_text(best_yaml(study, best, parent))
        frame.to_csv(tmp / "trials.csv", index=False)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        c = tracking.client(root)
        tracking.log_metrics(c, parent, {key: metrics[key] for key in
                                         ("best_value", "trials_complete", "trials_pruned", "trials_failed", "pruned_share")})
        c.set_tag(parent, "best_trial", str(best.number))
        c.set_tag(parent, "best_run_id", best.user_attrs.get("mlflow_run_id", ""))
        for name in ("best.yaml", "trials.csv", "metrics.json"):
            c.log_artifact(parent, str(tmp / name), artifact_path="sweep")
        c.set_terminated(parent, status="FINISHED")
    return out


def best_yaml(study: Study, best: optuna.trial.FrozenTrial, parent: str) -> str:
    """The best trial as an experiment YAML: `extends` the swept experiment and sets λ and t_max (and
    finetune.lr when the sweep searched it)."""
    cfg = study.params.sweep
    lengths = ", ".join(f"{m}×L" for m in cfg.val_multipliers)
    header = [
        f"# Best trial of Optuna study '{cfg.name}' ({_redacted(storage_url(study))}): trial {best.number},",
        f"# mean validation PPL at {lengths} = {best.value:.4f}; MLflow run {best.user_attrs.get('mlflow_run_id')}"
        f" under sweep run {parent}.",
        "# To train it with the ablations: copy this file to experiments/<name>.yaml, add <name> to params.yaml",
        "# `experiments` (and to an ablation's experiments), then run `clex pipeline` and `dvc repro`.",
    ]
    body = {"extends": cfg.experiment,
            "description": f"{cfg.experiment} with sweep {cfg.name}'s best λ and t_max (trial {best.number})",
            "rope": {"ode_width": best.params["ode_width"], "t_max": best.params["t_max"]}}
    if "lr" in best.params:
        body["finetune"] = {"lr": best.params["lr"]}
    return "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False)
