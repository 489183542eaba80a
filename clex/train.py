"""The pretrain and finetune stages: wire config, model, data, Trainer and MLflow together.

One function serves both: pretraining is "fine-tuning" plain RoPE from scratch at length L.
A killed run resumes from its last Lightning checkpoint into the same MLflow run (no orphan run),
as long as its configuration is unchanged; runs left RUNNING by a crash are marked KILLED. The resumed run
equals an uninterrupted one bit for bit on CPU: checkpoints are taken at update boundaries (`StepCheckpoint`),
the data continue after the windows already consumed (clex.data.TokenDataModule), t and the positions depend
only on (seed, step, micro-batch) (clex.lit), and the run's final metrics include those logged before the
resume (`LitDecoder.final_metrics`). A checkpoint that does not load is moved aside and the run resumes from
the one before it, or restarts (`resume_checkpoint`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only

from clex import tracking
from clex.attention import attention_for
from clex.config import Experiment, OptimConfig, ParamsError, RopeSpec, Study, TrainerConfig
from clex.data import TokenDataModule, data_hash
from clex.lit import BasisMonitor, LitDecoder, learns_basis, resolve_rope_lr
from clex.model import Decoder, parameter_count
from clex.passkey import MIN_FILLER, PasskeyFormat
from clex.rope import REFERENCE_SOLVER, ContinuousClex, build_position_encoding, max_rel_error, reference_table, solver_fix

PLAIN = Experiment(name="base", description="plain RoPE base model", rope=RopeSpec(type="rope"))


def data_dir(study: Study) -> Path:
    return study.root / "build" / "data"


def base_dir(study: Study) -> Path:
    return study.root / "build" / "base"


def finetune_dir(study: Study, experiment: str, seed: int) -> Path:
    return study.root / "build" / "finetune" / experiment / f"seed{seed}"


def vocab_size(study: Study) -> int:
    return json.loads((data_dir(study) / "manifest.json").read_text())["vocab_size"]


def build_model(study: Study, experiment: Experiment) -> Decoder:
    m = study.params.model
    rope = build_position_encoding(experiment.rope, head_dim=m.head_dim, base=m.rope_base, train_len=m.train_len)
    return Decoder(m, vocab_size(study), rope, attention_for(experiment, m.train_len))


def passkey_format(study: Study, length: int, what: str) -> PasskeyFormat:
    """The passkey format on the prepared tokenizer, checked to fit `length` tokens before any compute."""
    pk = study.params.passkey
    fmt = PasskeyFormat.from_tokenizer(data_dir(study) / "tokenizer.json", pk.digits, pk.needle, pk.question)
    if not fmt.fits(length):
        raise ParamsError(
            f"passkey.digits: {pk.digits} makes a passkey example {fmt.overhead} tokens plus more than "
            f"{MIN_FILLER} of filler, more than the {length} tokens of {what}; allowed: fewer digits or a "
            f"longer {what}"
        )
    return fmt


def load_checkpoint(study: Study, experiment: Experiment, ckpt: Path) -> Decoder:
    """A Decoder for `experiment` with weights from ckpt; rope.* entries come from ckpt when it has them."""
    model = build_model(study, experiment)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    own_rope = {k for k in model.state_dict() if k.startswith("rope.")}
    state = {k: v for k, v in state.items() if not k.startswith("rope.") or k in own_rope}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("rope.") for k in missing):
        raise RuntimeError(f"{ckpt}: does not fit the model (missing {missing}, unexpected {unexpected})")
    return model


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file and rename it into place, keeping the checkpoint it replaces as
    `<name>.prev`: a process killed while saving leaves the previous last.ckpt intact, a last.ckpt that does not
    load has an earlier one to fall back on (`resume_checkpoint`), and a write that fails (a full disk) leaves
    no partial file and raises an OSError naming the checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        tmp = Path(f"{path}.partial")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror, str(path)) from e
        if os.path.exists(path):
            os.replace(path, f"{path}.prev")
        os.replace(tmp, path)


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, saving at update boundaries before the last step only.

    Lightning forgets, when resumed, that the step it resumes from was saved, and saves it again after the next
    micro-batch: with gradient accumulation that is mid-update, and a checkpoint taken mid-update cannot resume
    exactly (the update's gradients are not in it). Nor does it checkpoint the last step: that state is the
    stage's output, and Lightning takes a step's checkpoint before that step's validation and skips the
    validation when it resumes from it, so a run killed after training would write outputs without its last
    validation; it resumes from an earlier checkpoint instead."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step < trainer.max_steps:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


LIGHTNING_CHECKPOINT_KEYS = ("state_dict", "optimizer_states", "loops", "global_step")


def resume_checkpoint(resume_dir: Path, stage: str) -> Path | None:
    """The checkpoint a rerun resumes from: last.ckpt, else the one before it (last.ckpt.prev), else None.

    One that does not load as a Lightning checkpoint (truncated, garbage bytes, another kind of file) is
    moved aside, never deleted, to `<resume dir>.<name>.corrupt-<time>` beside the resume folder (which is
    removed when the run ends), with one line saying so and whether the run resumes from the previous
    checkpoint or restarts. Rank 0 decides; the other DDP ranks start later and take the first that exists.
    """
    found = [p for p in (resume_dir / "last.ckpt", resume_dir / "last.ckpt.prev") if p.exists()]
    if rank_zero_only.rank != 0:
        return found[0] if found else None
    moved = []
    for path in found:
        try:  # the loader Trainer.fit(ckpt_path=...) uses
            ckpt = AtomicCheckpointIO().load_checkpoint(path)
            if not isinstance(ckpt, dict) or not all(k in ckpt for k in LIGHTNING_CHECKPOINT_KEYS):
                raise ValueError("not a Lightning checkpoint")
        except Exception as e:
            aside = resume_dir.with_name(f"{resume_dir.name}.{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            path.rename(aside)
            reason = (str(e).strip().splitlines() or [""])[0]
            moved.append(f"{path} does not load ({type(e).__name__}: {reason}); moved aside to {aside}")
            continue
        if moved:
            print(f"{stage}: {'; '.join(moved)}; resuming from {path.name} (step {ckpt['global_step']})",
                  file=sys.stderr)
        return path
    if moved:
        print(f"{stage}: {'; '.join(moved)}; no earlier checkpoint: restarting from step 0", file=sys.stderr)
    return None


def _read_state(state_file: Path) -> dict:
    """The resume folder's state.json ({config_hash, run_id}); {} when absent or unreadable (killed mid-write)."""
    try:
        return json.loads(state_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def resolve_trainer(cfg: TrainerConfig, learned_rope: bool) -> dict:
    """Trainer kwargs from params; bf16-mixed on CUDA when precision is 'auto'."""
    cuda = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16-mixed" if cuda else "32-true")
    strategy: object = cfg.strategy
    if cfg.strategy in ("ddp", "ddp_spawn", "ddp_fork") and learned_rope:
        # with t = 1 the CLEX network is skipped (docs/method.md §3.4), so its parameters get no gradient that step
        strategy = DDPStrategy(start_method=cfg.strategy.replace("ddp_", "") if "_" in cfg.strategy else "popen",
                               find_unused_parameters=True)
    return dict(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                strategy=strategy, precision=precision, gradient_clip_val=cfg.gradient_clip_val or None,
                plugins=[AtomicCheckpointIO()])


@dataclass(frozen=True)
class RunSpec:
    """What distinguishes one training run: its stage name, output folder, optimiser settings, validation
    and extras. The pipeline's stages take theirs from `stage_run`; a sweep trial (clex/sweep.py) sets its own
    stage and folder, extra MLflow tags and params, callbacks (pruning), and validation at several lengths
    (`val_lengths`: `val_ppl_<n>` and their mean `val_ppl`, each window run as `val_protocol` runs it) instead
    of `val_loss` at the training length."""

    stage: str
    out_dir: Path
    optim: OptimConfig
    val_windows: int
    val_every_n_steps: int
    val_lengths: list[int] | None = None
    val_batch_size: int | None = None  # None: optim.batch_size
    val_protocol: str = "progressive"  # with val_lengths: the evaluation protocol of the windows
    tags: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    callbacks: list = field(default_factory=list)


def stage_run(study: Study, experiment: Experiment | None, seed: int | None) -> RunSpec:
    """The pretrain stage's (experiment None) or a finetune stage's run: `trainer.val_batches` batches of
    validation windows at the training length every `trainer.val_every_n_steps` steps."""
    p = study.params
    if experiment is None:
        stage, out_dir, optim = "pretrain", base_dir(study), p.pretrain
    else:
        stage = tracking.stage_name("finetune", experiment.name, seed)
        out_dir, optim = finetune_dir(study, experiment.name, seed), study.finetune_config(experiment.name)
    return RunSpec(stage, out_dir, optim, val_windows=p.trainer.val_batches * optim.batch_size,
                   val_every_n_steps=min(p.trainer.val_every_n_steps, optim.steps))


class SolverAccuracyError(ParamsError):
    """A trained ODE's θ(t) is further from the reference solve than rope.solver.max_rel_error allows."""


def _yaml(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


def solver_check(rope: ContinuousClex, max_error: float, run: str) -> tuple[float, str | None]:
    """(max relative error of the trained θ(t) table against the reference solve over t = 2..t_max and all
    pairs, None or the failure message naming `run`, the error and the rope.solver settings that fix it)."""
    reference = reference_table(rope)
    err, at = max_rel_error(rope, reference)
    if err <= max_error:
        return err, None
    keys = ("method", "variable") + (("rtol", "atol") if "rtol" in rope.solver else ("step_size",))
    current = {k: rope.settings[k] for k in keys}
    fix = solver_fix(rope, reference, max_error)
    if fix is not None:
        found = (f"set rope.solver.{', rope.solver.'.join(f'{k}: {v:g}' for k, v in fix.items())} (the first of "
                 "the finer settings of the same method and variable that passes on these weights), or ")
    else:
        found = "no finer step of the same method and variable passes on these weights; set "
    return err, (
        f"{run}: the trained CLEX's θ(t) is up to {err:.2e} (relative, at t = {at}) away from the reference solve "
        f"{_yaml(REFERENCE_SOLVER)} in float64, above rope.solver.max_rel_error = {max_error:g} with rope.solver "
        f"{_yaml(current)}. Allowed: {found}the reference rope.solver {_yaml(REFERENCE_SOLVER)} (slow), or a larger "
        "rope.solver.max_rel_error. The solver also shapes training, so the fine-tune reruns; no outputs were written "
        "and the MLflow run is marked FAILED.")


def _config_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finetune_hash(study: Study, experiment: Experiment, optim: OptimConfig, seed: int, dhash: str, base_sha: str) -> str:
    """A fine-tune's resume key: its inputs (Study.finetune_inputs, so eval and sweep settings do not count), seed,
    data hash and base checkpoint; an attempt with another key starts over."""
    return _config_hash(study.finetune_inputs(experiment, optim), seed, dhash, base_sha)


def train(study: Study, experiment: Experiment | None = None, seed: int | None = None,
          run: RunSpec | None = None) -> Path:
    """Run the pretrain stage (experiment None), one finetune stage, or, with `run`, a fine-tune set up by
    the caller (a sweep trial); returns its output directory."""
    p = study.params
    pretraining = experiment is None
    exp = PLAIN if pretraining else experiment
    seed = p.pretrain.seed if pretraining else seed
    run = run or stage_run(study, experiment, seed)
    optim, stage, out_dir = run.optim, run.stage, run.out_dir
    seq_len = p.model.train_len * (1 if pretraining else optim.seq_len_factor)
    resume_dir = study.root / "build" / "resume" / stage
    L.seed_everything(seed, workers=True, verbose=False)

    mixing = not pretraining and p.passkey.train_fraction > 0
    fmt = passkey_format(study, seq_len + 1, "model.train_len × finetune.seq_len_factor (+1)") if mixing else None
    if pretraining:
        model = build_model(study, exp)
        base_sha = None
    else:
        model = load_checkpoint(study, exp, base_dir(study) / "model.pt")
        base_sha = json.loads((base_dir(study) / "run.json").read_text())["checkpoint_sha256"]
    rope_lr, step_scale = resolve_rope_lr(optim, model.rope)  # S from the weights at init
    dhash = data_hash(data_dir(study))
    config_hash = (_config_hash(p.model_dump(), optim.model_dump(), exp.model_dump(), seed, dhash, base_sha)
                   if pretraining else finetune_hash(study, exp, optim, seed, dhash, base_sha))

    root = study.root
    if rank_zero_only.rank == 0:
        tracking.experiment_id(root)  # created once, with its artifact location anchored at the root
    # an earlier attempt with the same configuration whose run the store still holds: continue that run, from
    # its checkpoint if one loads
    state_file = resume_dir / "state.json"
    state = _read_state(state_file)
    same_run = state.get("config_hash") == config_hash and tracking.run_status(tracking.client(root), state.get("run_id")) is not None
    if rank_zero_only.rank == 0 and not same_run:
        shutil.rmtree(resume_dir, ignore_errors=True)
    last = resume_checkpoint(resume_dir, stage) if same_run else None
    resuming = last is not None
    tags = {
        "role": "pretrain" if pretraining else "finetune", "experiment": exp.name, "seed": str(seed),
        "ablations": tracking.ablations_of(study, exp.name), "git_commit": tracking.git_commit(root),
        "data_hash": dhash, "dvc_stage": stage, "config_hash": config_hash,
    }
    if base_sha:
        tags["base_checkpoint_sha256"] = base_sha
    tags.update(run.tags)
    logger = MLFlowLogger(
        experiment_name=tracking.MLFLOW_EXPERIMENT, run_name=stage, tracking_uri=tracking.tracking_uri(root),
        tags=tags, run_id=state.get("run_id") if same_run else None,
    )
    if rank_zero_only.rank == 0:
        run_id = logger.run_id  # creates (or reopens) the run before any worker starts
        resume_dir.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"config_hash": config_hash, "run_id": run_id}))
        tracking.close_stale_runs(root, stage, keep=run_id)
        recorded = ({**tracking.flatten(p.model_dump()), **tracking.flatten(exp.model_dump(), "exp.")} if pretraining
                    else tracking.flatten(study.finetune_inputs(exp, optim)))  # what the fine-tune depends on
        logger.log_hyperparams({**recorded, "seed": seed, "n_params": parameter_count(model), "seq_len": seq_len,
                                **({} if pretraining else {"rope_lr_resolved": rope_lr, "rope_step_scale": step_scale}),
                                **run.params})

    cfg = p.trainer
    ckpt = StepCheckpoint(dirpath=resume_dir, every_n_train_steps=cfg.checkpoint_every_n_steps, save_last=True,
                          save_top_k=0, enable_version_counter=False)
    monitor = [BasisMonitor(model.rope, cfg.log_every_n_steps)] if learns_basis(model.rope) else []
    trainer = L.Trainer(
        **resolve_trainer(cfg, learned_rope=any(True for _ in model.rope.parameters())),
        max_steps=optim.steps, accumulate_grad_batches=optim.accumulate, logger=logger,
        callbacks=[ckpt, *monitor, *run.callbacks], log_every_n_steps=cfg.log_every_n_steps,
        # val_check_interval counts micro-batches; run.val_windows sets the validation set
        val_check_interval=run.val_every_n_steps * optim.accumulate, limit_val_batches=1.0,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, default_root_dir=resume_dir,
    )
    lit = LitDecoder(model, optim, seed, exp.position_sampling, val_protocol=run.val_protocol if run.val_lengths else None,
                     rope_lr=rope_lr)
    # accumulate micro-batches of batch_size/accumulate per update: the same windows per update as one batch
    dm = TokenDataModule(data_dir(study), seq_len, optim.batch_size // optim.accumulate,
                         train_samples=optim.steps * optim.batch_size * trainer.world_size,
                         val_windows=run.val_windows, seed=seed, num_workers=cfg.num_workers,
                         passkey=(fmt, p.passkey.train_fraction) if mixing else None,
                         val_lengths=run.val_lengths, val_batch_size=run.val_batch_size or optim.batch_size)
    started = time.perf_counter()
    with warnings.catch_warnings():  # the data do resume (TokenDataModule.consumed_samples), not by Lightning's means
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable")
        trainer.fit(lit, dm, ckpt_path=str(last) if resuming else None)
    seconds = time.perf_counter() - started
    if isinstance(model.rope, ContinuousClex):
        _check_solver(study, model.rope, exp.rope.solver.max_rel_error, stage, logger, trainer, resume_dir)
    if trainer.is_global_zero:
        tokens = optim.steps * trainer.world_size * optim.batch_size * seq_len
        _write_outputs(study, model, out_dir, logger.run_id, tags, trainer, lit.final_metrics(), tokens, seconds,
                       resuming)
        shutil.rmtree(resume_dir, ignore_errors=True)
    return out_dir


def _check_solver(study, rope, max_error, stage, logger, trainer, resume_dir) -> None:
    """The end-of-fine-tune solver check (every rank computes it; rank 0 logs `solver_max_rel_error` and, when
    it fails, marks the run FAILED and drops the resume state); raises SolverAccuracyError when it fails."""
    run_id = logger.run_id if trainer.is_global_zero else None
    err, failure = solver_check(rope, max_error, f"{stage} (MLflow run {run_id})")
    if trainer.is_global_zero:
        c = tracking.client(study.root)
        c.log_metric(run_id, "solver_max_rel_error", err, step=trainer.global_step)
        if failure:
            c.set_terminated(run_id, status="FAILED")
            shutil.rmtree(resume_dir, ignore_errors=True)
    if failure:
        raise SolverAccuracyError(failure)


def _write_outputs(study, model, out_dir, run_id, tags, trainer, metrics, tokens, seconds, resumed) -> None:
    """model.pt + run.json into out_dir (atomically), and the run's hash, throughput and θ(t) artifacts."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    sha = tracking.file_sha256(tmp / "model.pt")
    info = {"run_id": run_id, "stage": tags["dvc_stage"], "experiment": tags["experiment"], "seed": int(tags["seed"]),
            "checkpoint_sha256": sha, "data_hash": tags["data_hash"], "git_commit": tags["git_commit"],
            "steps": trainer.global_step, "train_tokens": tokens, "train_seconds": round(seconds, 2),
            "train_tokens_per_s": round(tokens / seconds, 1) if not resumed else None, "metrics": metrics}
    freq = model.rope.frequency_table().cpu()
    table = {"t": list(range(1, freq.shape[0] + 1)), "inv_freq": freq.tolist()}
    (tmp / "run.json").write_text(json.dumps(info, indent=2))
    (tmp / "frequencies.json").write_text(json.dumps(table))
    c = tracking.client(study.root)
    c.set_tag(run_id, "checkpoint_sha256", sha)
    if info["train_tokens_per_s"]:
        c.log_metric(run_id, "train_tokens_per_s", info["train_tokens_per_s"])
    c.log_artifact(run_id, str(tmp / "run.json"))
    c.log_artifact(run_id, str(tmp / "frequencies.json"))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
