"""The pretrain and finetune stages: wire config, model, data, Trainer and MLflow together.

One function serves both: pretraining is "fine-tuning" plain RoPE from scratch at length L.
A killed run resumes from its last Lightning checkpoint into the same MLflow run (no orphan run),
as long as its configuration is unchanged; runs left RUNNING by a crash are marked KILLED. The resumed run
equals an uninterrupted one bit for bit on CPU: checkpoints are taken at update boundaries (`StepCheckpoint`),
the data continue after the windows already consumed (`TokenDataModule`), t and the positions depend
only on (seed, step, micro-batch) (clex.lit), and the run's final metrics include those logged before the
resume (`LitDecoder.final_metrics`). A checkpoint that does not load is moved aside and the run resumes from
the one before it, or restarts (`resume_checkpoint`). The model is built and loaded by clex/checkpoint.py, its
paths come from clex/layout.py, its MLflow tags from `tracking.run_tags`, its writes go through clex/io.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
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
from torch.utils.data import DataLoader, Dataset

from clex import layout, tracking
from clex.checkpoint import HF_FOLDER, PLAIN, SOURCE_JSON, build_model, checkpoint_path, load_checkpoint
from clex.config import Experiment, OptimConfig, ParamsError, Study, TrainerConfig
from clex.data import FixedWindows, TokenWindows, data_hash, load_tokens
from clex.distributed import apply_activation_checkpointing, fsdp_strategy, model_state_dict
from clex.io import atomic_dir, atomic_file, atomic_write_text
from clex.lit import BasisMonitor, LitDecoder, learns_basis, resolve_rope_lr
from clex.model import parameter_count
from clex.passkey import passkey_format
from clex.rope import (REFERENCE_SOLVER, ContinuousClex, build_position_encoding, max_rel_error, reference_table,
                       solver_fix)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file and rename it into place, keeping the checkpoint it replaces as
    `<name>.prev`: a process killed while saving leaves the previous last.ckpt intact, a last.ckpt that does not
    load has an earlier one to fall back on (`resume_checkpoint`), and a write that fails (a full disk) leaves
    no partial file and raises an OSError naming the checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with atomic_file(Path(path)) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            if Path(path).exists():
                Path(path).replace(f"{path}.prev")


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


class Resumed(Dataset):
    """`dataset` from item `start` on (item i is dataset[start + i], wrapping at the end), with the same length:
    a resumed run's loader yields exactly the items an uninterrupted one would yield from that point, while
    Lightning's restored batch counters (which continue from the checkpoint) still match its length."""

    def __init__(self, dataset: Dataset, start: int):
        self.dataset, self.start = dataset, start

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset[(self.start + i) % len(self.dataset)]


class TokenDataModule(L.LightningDataModule):
    """Training windows (random, seeded; optionally mixed with passkey examples) and validation windows
    (fixed, never mixed) from the prepared token streams.

    Training resumes where it stopped: a trainer restored from a checkpoint has taken `global_step` updates of
    `accumulate_grad_batches` micro-batches on every rank, i.e. consumed the first `consumed_samples()` windows
    (checkpoints are taken at update boundaries, clex.train.StepCheckpoint), so its loader starts after them
    (`Resumed`); under DDP each rank's share of the rest is then the one it would have had.
    """

    def __init__(self, data_dir: Path, seq_len: int, batch_size: int, train_samples: int, val_windows: int,
                 seed: int, num_workers: int = 0, passkey: tuple | None = None, val_lengths: list[int] | None = None,
                 val_batch_size: int | None = None):
        super().__init__()
        self.passkey = passkey  # (PasskeyFormat, fraction): that share of training windows become passkey examples
        # validation at other lengths than seq_len (the sweep's objective): one loader per length
        self.val_lengths, self.val_batch_size = val_lengths, val_batch_size or batch_size
        self.data_dir, self.seq_len, self.batch_size = Path(data_dir), seq_len, batch_size
        self.train_samples, self.val_windows, self.seed, self.num_workers = train_samples, val_windows, seed, num_workers

    def _loader(self, ds: Dataset, batch_size: int | None = None) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size or self.batch_size, shuffle=False, drop_last=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def consumed_samples(self) -> int:
        """Training windows the attached trainer's restored updates consumed (0 before the first update)."""
        t = self.trainer
        return 0 if t is None else t.global_step * t.accumulate_grad_batches * self.batch_size * t.world_size

    def train_dataloader(self) -> DataLoader:
        windows = TokenWindows(load_tokens(self.data_dir, "train"), self.seq_len, self.train_samples, self.seed)
        if self.passkey is not None:
            from clex.passkey import PasskeyMix

            windows = PasskeyMix(windows, *self.passkey, seed=self.seed)
        start = self.consumed_samples()
        return self._loader(Resumed(windows, start) if start else windows)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        tokens = load_tokens(self.data_dir, "val")
        if self.val_lengths is None:
            return self._loader(FixedWindows(tokens, self.seq_len, self.val_windows))
        return [self._loader(FixedWindows(tokens, n, self.val_windows), self.val_batch_size) for n in self.val_lengths]


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
    """The resume folder's state.json ({config_hash, run_id}); {} when absent or unreadable (a damaged file)."""
    try:
        return json.loads(state_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def resolve_trainer(cfg: TrainerConfig, model: torch.nn.Module) -> dict:
    """Trainer kwargs from params; bf16-mixed on CUDA when precision is 'auto'. fsdp is `clex.distributed`'s
    FSDPStrategy for this model; ddp keeps find_unused_parameters for a learned encoding."""
    strategy: object = cfg.strategy
    if cfg.strategy == "fsdp":
        strategy = fsdp_strategy(cfg, model)
    elif cfg.strategy in ("ddp", "ddp_spawn", "ddp_fork") and any(True for _ in model.rope.parameters()):
        # with t = 1 the CLEX network is skipped (docs/method.md §3.4), so its parameters get no gradient that step
        strategy = DDPStrategy(start_method=cfg.strategy.replace("ddp_", "") if "_" in cfg.strategy else "popen",
                               find_unused_parameters=True)
    return dict(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                strategy=strategy, precision=cfg.resolved_precision(), gradient_clip_val=cfg.gradient_clip_val or None,
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
    role: str | None = None  # the MLflow `role` tag; None: pretrain or finetune
    parent: str | None = None  # the MLflow run this run nests under (a sweep trial: the sweep's run)
    tags: dict = field(default_factory=dict)  # added to, or replacing, the common tags (`tracking.run_tags`)
    params: dict = field(default_factory=dict)
    callbacks: list = field(default_factory=list)


def stage_run(study: Study, experiment: Experiment | None, seed: int | None) -> RunSpec:
    """The pretrain stage's (experiment None) or a finetune stage's run: `trainer.val_batches` batches of
    validation windows at the training length every `trainer.val_every_n_steps` steps."""
    p = study.params
    if experiment is None:
        stage, out_dir, optim = "pretrain", layout.base_dir(study.root), p.pretrain
    else:
        stage = tracking.stage_name("finetune", experiment.name, seed)
        out_dir, optim = layout.finetune_dir(study.root, experiment.name, seed), study.finetune_config(experiment.name)
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
    if pretraining and p.model.source == "hf":
        return adopt(study)
    exp = PLAIN if pretraining else experiment
    seed = p.pretrain.seed if pretraining else seed
    run = run or stage_run(study, experiment, seed)
    optim, stage, out_dir = run.optim, run.stage, run.out_dir
    seq_len = p.model.train_len * (1 if pretraining else optim.seq_len_factor)
    resume_dir = layout.resume_dir(study.root, stage)
    L.seed_everything(seed, workers=True, verbose=False)

    mixing = not pretraining and p.passkey.train_fraction > 0
    fmt = passkey_format(study, seq_len + 1, "model.train_len × finetune.seq_len_factor (+1)") if mixing else None
    if pretraining:
        model = build_model(study, exp)
        base_sha = None
    else:
        model = load_checkpoint(study, exp, checkpoint_path(study, layout.base_dir(study.root)))
        base_sha = json.loads((layout.base_dir(study.root) / "run.json").read_text())["checkpoint_sha256"]
    rope = model.rope  # the encoding itself: under FSDP, model.rope becomes its wrapper once training starts
    rope_lr, step_scale = resolve_rope_lr(optim, rope)  # S from the weights at init
    dhash = data_hash(layout.data_dir(study.root))
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
    tags = {**tracking.run_tags(root, stage, run.role or ("pretrain" if pretraining else "finetune"), parent=run.parent,
                                experiment=exp.name, seed=seed, ablations=tracking.ablations_of(study, exp.name),
                                data_hash=dhash, config_hash=config_hash, base_checkpoint_sha256=base_sha,
                                model_source=p.model.source_tag),
            **run.tags}
    logger = MLFlowLogger(
        experiment_name=tracking.MLFLOW_EXPERIMENT, run_name=stage, tracking_uri=tracking.tracking_uri(root),
        tags=tags, run_id=state.get("run_id") if same_run else None,
    )
    if rank_zero_only.rank == 0:
        run_id = logger.run_id  # creates (or reopens) the run before any worker starts
        resume_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(state_file, json.dumps({"config_hash": config_hash, "run_id": run_id}))
        tracking.close_stale_runs(root, stage, keep=run_id)
        recorded = ({**tracking.flatten(p.model_dump()), **tracking.flatten(exp.model_dump(), "exp.")} if pretraining
                    else tracking.flatten(study.finetune_inputs(exp, optim)))  # what the fine-tune depends on
        logger.log_hyperparams({**recorded, **shape_params(model.cfg), "seed": seed, "n_params": parameter_count(model),
                                "seq_len": seq_len,
                                **({} if pretraining else {"rope_lr_resolved": rope_lr, "rope_step_scale": step_scale}),
                                **run.params})

    cfg = p.trainer
    ckpt = StepCheckpoint(dirpath=resume_dir, every_n_train_steps=cfg.checkpoint_every_n_steps, save_last=True,
                          save_top_k=0, enable_version_counter=False)
    monitor = [BasisMonitor(model.rope, cfg.log_every_n_steps)] if learns_basis(model.rope) else []
    resolved = resolve_trainer(cfg, model)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model, resolved["strategy"])
    trainer = L.Trainer(
        **resolved,
        max_steps=optim.steps, accumulate_grad_batches=optim.accumulate, logger=logger,
        callbacks=[ckpt, *monitor, *run.callbacks], log_every_n_steps=cfg.log_every_n_steps,
        # val_check_interval counts micro-batches; run.val_windows sets the validation set
        val_check_interval=run.val_every_n_steps * optim.accumulate, limit_val_batches=1.0,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, default_root_dir=resume_dir,
    )
    lit = LitDecoder(model, optim, seed, exp.position_sampling, val_protocol=run.val_protocol if run.val_lengths else None,
                     rope_lr=rope_lr)
    # accumulate micro-batches of batch_size/accumulate per update: the same windows per update as one batch
    dm = TokenDataModule(layout.data_dir(study.root), seq_len, optim.batch_size // optim.accumulate,
                         train_samples=optim.steps * optim.batch_size * trainer.world_size,
                         val_windows=run.val_windows, seed=seed, num_workers=cfg.num_workers,
                         passkey=(fmt, p.passkey.train_fraction) if mixing else None,
                         val_lengths=run.val_lengths, val_batch_size=run.val_batch_size or optim.batch_size)
    started = time.perf_counter()
    with warnings.catch_warnings():  # the data do resume (TokenDataModule.consumed_samples), not by Lightning's means
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable")
        trainer.fit(lit, dm, ckpt_path=str(last) if resuming else None)
    seconds = time.perf_counter() - started
    if isinstance(rope, ContinuousClex):
        _check_solver(study, rope, exp.rope.solver.max_rel_error, stage, logger, trainer, resume_dir)
    state = model_state_dict(trainer)  # every rank: under FSDP a collective that gives rank 0 the whole model
    if trainer.is_global_zero:
        tokens = optim.steps * trainer.world_size * optim.batch_size * seq_len
        _write_outputs(study, model, state, out_dir, logger.run_id, tags, trainer, lit.final_metrics(), tokens, seconds,
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


def shape_params(cfg) -> dict[str, str]:
    """A Hugging Face model's real shape (`model.cfg`, a clex.hf.HFShape: what its config.json says, not the
    decoder-only model keys) as `shape.*` MLflow params; {} for our Decoder (its ModelConfig: the model.* params)."""
    return tracking.flatten(dataclasses.asdict(cfg), "shape.") if dataclasses.is_dataclass(cfg) else {}


def _frequencies(rope) -> str:
    """frequencies.json: the encoding's θ(t) table, t = 1..rows."""
    freq = rope.frequency_table().cpu()
    return json.dumps({"t": list(range(1, freq.shape[0] + 1)), "inv_freq": freq.tolist()})


def adopt(study: Study) -> Path:
    """The pretrain stage of a Hugging Face study (model.source hf): the checkpoint is the base model, adopted as it
    is (no training, no copy of its weights). build/base gets run.json (checkpoint_sha256: the checkpoint folder's
    `tracking.folder_sha256`, steps 0), frequencies.json (plain RoPE on its rope_theta) and source.json (its path
    and hash), and one MLflow run tagged like a pretrain run plus model_source hf, with its shape (`shape.*`) and
    n_params as params (counted on the meta device: nothing is loaded but config.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from clex.hf import ARCHITECTURES, checkpoint_dir, hf_shape

    p, root, stage = study.params, study.root, "pretrain"
    folder = checkpoint_dir(p.model, root)
    config = AutoConfig.from_pretrained(str(folder))
    if config.model_type not in ARCHITECTURES:  # a hub id's config is first read here
        raise ParamsError(f"model.path: {p.model.path!r} holds model_type {config.model_type!r}; allowed: "
                          f"{list(ARCHITECTURES)} (docs/hf.md)")
    with torch.device("meta"):
        n_params = parameter_count(AutoModelForCausalLM.from_config(config))
    shape = hf_shape(config, p.model.train_len)
    table = _frequencies(build_position_encoding(PLAIN.rope, head_dim=shape.head_dim, base=shape.rope_base,
                                                 train_len=shape.train_len))
    sha, dhash = tracking.folder_sha256(folder), data_hash(layout.data_dir(root))
    tags = tracking.run_tags(root, stage, "pretrain", experiment=PLAIN.name, seed=p.pretrain.seed,
                             ablations=tracking.ablations_of(study, PLAIN.name), data_hash=dhash,
                             config_hash=_config_hash(p.model_dump(), sha, dhash), checkpoint_sha256=sha,
                             model_source="hf")
    params = {**tracking.flatten(p.model_dump()), **tracking.flatten(PLAIN.model_dump(), "exp."),
              **shape_params(shape), "seed": p.pretrain.seed, "n_params": n_params,
              "seq_len": p.model.train_len}
    tracking.experiment_id(root)
    tracking.close_stale_runs(root, stage)
    out_dir = layout.base_dir(root)
    with tracking.open_run(root, stage, tags, params) as run_id, atomic_dir(out_dir) as tmp:
        info = {"run_id": run_id, "stage": stage, "experiment": PLAIN.name, "seed": p.pretrain.seed,
                "checkpoint_sha256": sha, "data_hash": dhash, "git_commit": tags["git_commit"], "steps": 0,
                "train_tokens": 0, "train_seconds": 0.0, "train_tokens_per_s": None, "metrics": {},
                "model_source": "hf"}
        source = {"source": "hf", "path": p.model.path, "checkpoint_sha256": sha, "model_type": config.model_type,
                  "shape": dataclasses.asdict(shape), "n_params": n_params}
        (tmp / "run.json").write_text(json.dumps(info, indent=2))
        (tmp / "frequencies.json").write_text(table)
        (tmp / SOURCE_JSON).write_text(json.dumps(source, indent=2))
        c = tracking.client(root)
        for name in ("run.json", "frequencies.json", SOURCE_JSON):
            c.log_artifact(run_id, str(tmp / name))
    return out_dir


def _write_outputs(study, model, state, out_dir, run_id, tags, trainer, metrics, tokens, seconds, resumed) -> None:
    """The weights (`state`, the full state dict) as model.pt, or for a Hugging Face model as its hf/ folder
    (`HFDecoder.save_pretrained`), + run.json into out_dir (atomically), and the run's hash, throughput and θ(t)
    artifacts."""
    with atomic_dir(out_dir) as tmp:
        if study.params.model.source == "hf":
            sha = tracking.folder_sha256(model.save_pretrained(tmp / HF_FOLDER, state))
        else:
            torch.save(state, tmp / "model.pt")
            sha = tracking.file_sha256(tmp / "model.pt")
        info = {"run_id": run_id, "stage": tags["dvc_stage"], "experiment": tags["experiment"],
                "seed": int(tags["seed"]), "checkpoint_sha256": sha, "data_hash": tags["data_hash"],
                "git_commit": tags["git_commit"], "steps": trainer.global_step, "train_tokens": tokens,
                "train_seconds": round(seconds, 2),
                "train_tokens_per_s": round(tokens / seconds, 1) if not resumed else None, "metrics": metrics}
        (tmp / "run.json").write_text(json.dumps(info, indent=2))
        (tmp / "frequencies.json").write_text(_frequencies(model.rope))
        c = tracking.client(study.root)
        c.set_tag(run_id, "checkpoint_sha256", sha)
        if info["train_tokens_per_s"]:
            c.log_metric(run_id, "train_tokens_per_s", info["train_tokens_per_s"])
        c.log_artifact(run_id, str(tmp / "run.json"))
        c.log_artifact(run_id, str(tmp / "frequencies.json"))
