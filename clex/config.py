"""Typed study parameters: the one place where every knob is declared, defaulted and checked, but for each
position encoding's own `rope:` keys, declared beside its module in clex/rope/ and validated here with the rest.

`load_study()` reads params.yaml, every experiments/*.yaml and every ablations/*/ablation.yaml and
validates them together before any compute. A bad value raises `ParamsError`, whose message names
the file, the key, the bad value and what is allowed; the CLI prints it and exits non-zero. Files are read
as UTF-8 YAML with duplicate keys refused (`read_yaml_text`); values are checked strictly (no coercion, no
NaN or infinity: `Strict`, clex/spec.py).
"""
from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_serializer,
                      model_validator)
from pydantic_core import PydanticCustomError

from clex.rope import REGISTRY, on_change, position_spec, types_with
from clex.rope import ClexSpec, RopeSpec, SolverSpec  # noqa: F401 (re-exported: other modules import them from here)
from clex.spec import Strict


class ParamsError(ValueError):
    """A params value is invalid; the message says which key, which value and what is allowed. The CLI prints
    `clex <command>: <kind>` and the message, and exits 2: no traceback."""

    kind = "invalid parameters"


class NonFiniteError(ParamsError):
    """A result (PPL, NLL, passkey score) is NaN or infinite: the stage stops before it is logged or written,
    naming the run, the length and the likely cause (clex/evaluate.py), and a report refuses one read back."""

    kind = "non-finite result"


# ---------------------------------------------------------------------------- data
class DataConfig(Strict):
    """Where the text comes from, how it is split and tokenised."""

    source: Literal["stdlib", "files", "hf"] = "stdlib"
    files: str | None = Field(None, description="glob of local text files (source=files); ** allowed")
    hf_name: str | None = Field(None, description="dataset name or local dataset path (source=hf)")
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    max_documents: int | None = Field(None, ge=3, description="deterministic subset, for quick runs")
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    test_fraction: float = Field(0.05, gt=0, lt=0.5)
    split_seed: int = 0
    vocab_size: int = Field(
        4096, ge=257, le=65535,
        description="byte-level BPE: 256 byte tokens + <|endoftext|> at least; uint16 storage at most",
    )
    max_test_docs: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _source_fields(self, info: ValidationInfo) -> "DataConfig":
        if self.source == "files":
            if not self.files:
                raise ValueError("data.files: required when data.source is 'files' (a glob of text files)")
            root = (info.context or {}).get("root", ".")  # load_study's: the study root
            if not any(Path(p).is_file() for p in glob.glob(self.corpus_glob(root), recursive=True)):
                raise ValueError(
                    f"data.files: {self.files!r} matches no file; allowed: a glob matching at least one text file"
                )
        if self.source == "hf" and not self.hf_name:
            raise ValueError("data.hf_name: required when data.source is 'hf' (a dataset name or local path)")
        return self

    def corpus_glob(self, root: Path | str = ".") -> str:
        """The `files` glob as read: a relative glob is relative to the study root, not the current directory."""
        return str(Path(root) / self.files)

    def tracked_corpus(self, root: Path) -> str | None:
        """The local path DVC tracks for the corpus, as a dependency of `prepare` (so an edited, added or removed
        file reruns it): for `files`, the folder the glob is rooted at (its parts before the first wildcard; the
        file itself without one), since DVC deps cannot be globs and that folder holds every file the glob can
        match (an edit to a file it does not match reruns prepare too: safe, rare); a local `hf_name` folder;
        None for the stdlib corpus and a hub dataset. Relative paths are relative to the study root."""
        if self.source == "files":
            fixed = [] if Path(self.files).is_absolute() else ["."]
            for part in Path(self.files).parts:
                if any(c in part for c in "*?["):
                    break
                fixed.append(part)
            return str(Path(*fixed))
        if self.source == "hf" and (Path(root) / self.hf_name).exists():
            return self.hf_name
        return None


# ---------------------------------------------------------------------------- model
HF_ARCHITECTURES = ("llama", "mistral", "qwen2")  # config.json model_type values clex/hf.py supports (tested there)
HF_ONLY_KEYS = ("source", "path", "attn_implementation")  # absent from a decoder study's dumps (`_dump`)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")  # owner/name on the Hugging Face hub


class ModelConfig(Strict):
    """The model: a small LLaMA-style decoder trained here (`source: decoder`), or a LLaMA-family Hugging Face
    checkpoint (`source: hf`, docs/hf.md "Running the study on a checkpoint"). `train_len` is L, the pre-training
    context (for a checkpoint: the context it was trained at, e.g. 4096 for LLaMA-2).

    With `source: hf`, `path` names the checkpoint: a local folder (relative to the study root) holding a config.json
    whose model_type is one of HF_ARCHITECTURES, or, for a path that does not exist locally and reads `owner/name`,
    a hub id (needs a network once; write `./<folder>` to mean a local folder). The decoder-only keys (d_model,
    n_layers, n_heads, d_ff, rope_base, init_std) are then ignored: the checkpoint's config.json defines the shape,
    which every run records as `shape.*` MLflow params. `attn_implementation` (hf only): auto = flash_attention_2
    when flash_attn imports, training runs on CUDA (trainer.accelerator allows it, a GPU is visible) and the
    encoding is rotary, else sdpa (clex/checkpoint.py).
    For `source: decoder` the hf keys are left out of `model_dump()` (`_dump`), so a decoder study's config hashes,
    MLflow params and resume keys are the ones it had before they existed.
    """

    source: Literal["decoder", "hf"] = "decoder"
    path: str | None = Field(None, description="source hf: a local checkpoint folder or a hub id")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    d_model: int = Field(128, ge=8)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    d_ff: int = Field(384, ge=8, description="SwiGLU hidden width")
    rope_base: float = Field(10000.0, gt=1)
    train_len: int = Field(128, ge=8, description="L: pre-training context length")
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _heads(self, info: ValidationInfo) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"model.n_heads: {self.n_heads} must divide model.d_model={self.d_model}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"model.d_model/n_heads = {self.d_model // self.n_heads}: head dim must be even for RoPE")
        if self.source == "decoder":
            return self
        if not self.path:
            raise ValueError("model.path: required when model.source is 'hf'; allowed: a local checkpoint folder "
                             "(relative to the study root) or a hub id 'owner/name'")
        folder = self.local_path((info.context or {}).get("root", "."))
        if folder is None:  # a hub id: its config is read when the checkpoint is downloaded
            return self
        if not folder.exists():
            raise ValueError(f"model.path: {self.path!r} does not exist; allowed: a local checkpoint folder holding "
                             "config.json (relative to the study root), or a hub id 'owner/name'")
        config = folder / "config.json"
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"model.path: {self.path!r} has no readable config.json ({type(e).__name__}); allowed: "
                             "a Hugging Face checkpoint folder (config.json, weights, tokenizer)") from None
        if model_type not in HF_ARCHITECTURES:
            raise ValueError(f"model.path: {self.path!r} holds model_type {model_type!r}; allowed: "
                             f"{list(HF_ARCHITECTURES)} (docs/hf.md)")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        out = handler(self)
        return {k: v for k, v in out.items() if k not in HF_ONLY_KEYS} if self.source == "decoder" else out

    def local_path(self, root: Path | str = ".") -> Path | None:
        """The checkpoint folder of a hf model when `path` is local (relative paths: from the study root); None for
        the decoder and for a hub id."""
        if self.source != "hf" or not self.path:
            return None
        folder = Path(root) / self.path
        return folder if folder.exists() or not HUB_ID.match(self.path) else None

    def tracked_path(self, root: Path | str = ".") -> str | None:
        """`path` as DVC tracks it (a dependency of `prepare`): a local checkpoint folder; None otherwise."""
        return self.path if self.local_path(root) is not None else None

    @property
    def source_tag(self) -> str | None:
        """The `model_source` tag of every run of a hf study; None (no tag) for the decoder."""
        return "hf" if self.source == "hf" else None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


# ---------------------------------------------------------------------------- training
Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimConfig(Strict):
    """AdamW with linear warm-up and cosine decay to `min_lr_ratio * lr`; `batch_size` sequences per update,
    in `accumulate` micro-batches of batch_size/accumulate that each draw their own t and positions (the
    official recipe draws t on every forward and accumulates 4 of them per update)."""

    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: list[Beta] = Field([0.9, 0.95], min_length=2, max_length=2, description="AdamW (β1, β2); official 0.999")
    accumulate: int = Field(1, ge=1, description="micro-batches per optimizer update; must divide batch_size")

    @field_validator("accumulate")
    @classmethod
    def _divides_batch(cls, v: int, info: ValidationInfo) -> int:
        batch = info.data.get("batch_size")
        if batch is not None and batch % v:
            raise PydanticCustomError(
                "divisor", "must divide batch_size={batch} (the same section's); allowed: a divisor of it",
                {"batch": batch})
        return v


class PretrainConfig(OptimConfig):
    seed: int = 0


class FinetuneConfig(OptimConfig):
    """The fine-tune's optimiser; an experiment may override any key but `seeds` (`Study.finetune_config`).

    The position encoding's parameters (CLEX's ODE or discrete network) get their own learning rate: `rope_lr`,
    or one derived from `rope_step` = how far one Adam update should move z(t_max) = ln θ(t_max) at init
    (rope lr = rope_step / S, S = max_j Σ_p |∂z_j(t_max)/∂p|; `clex.rope.effective_step_scale`).
    """

    seeds: list[int] = Field([0, 1, 2], min_length=1)
    seq_len_factor: int = Field(1, ge=1, description="fine-tuning length N = seq_len_factor * L")
    rope_lr: float | None = Field(None, ge=0, le=1, description="lr of the encoding's parameters; null: lr; 0 freezes them")
    rope_step: float | None = Field(None, gt=0, allow_inf_nan=False,
                                    description="rope lr = rope_step / S: z(t_max) moves about this much per update")

    @model_validator(mode="after")
    def _unique_seeds(self) -> "FinetuneConfig":
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"finetune.seeds: {self.seeds} has duplicates; allowed: distinct integers")
        if self.rope_lr is not None and self.rope_step is not None:
            raise ValueError(f"finetune.rope_lr: {self.rope_lr} and finetune.rope_step: {self.rope_step} are both "
                             "set; allowed: at most one of them (the other null)")
        return self


class TrainerConfig(Strict):
    """Lightning Trainer settings; 'auto' precision means bf16-mixed on CUDA, 32-true elsewhere."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | Literal["auto"] = 1
    num_nodes: int = Field(1, ge=1)
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_fork", "fsdp", "deepspeed"] = "auto"
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "auto"
    gradient_clip_val: float = Field(1.0, ge=0)
    checkpoint_every_n_steps: int = Field(100, ge=1)
    val_every_n_steps: int = Field(100, ge=1)
    val_batches: int = Field(8, ge=1)
    log_every_n_steps: int = Field(10, ge=1)
    num_workers: int = Field(0, ge=0)
    activation_checkpointing: bool = False  # recompute each decoder layer's activations in backward (clex/distributed.py)

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise PydanticCustomError("devices", "allowed: a number of devices >= 1, or 'auto'")

    def uses_cuda(self) -> bool:
        """Whether training (and evaluation, clex/checkpoint.py) runs on CUDA: the accelerator allows it and a GPU
        is visible."""
        import torch

        return self.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()

    def resolved_precision(self) -> str:
        """`precision` with 'auto' resolved: bf16-mixed on CUDA, 32-true elsewhere."""
        return self.precision if self.precision != "auto" else ("bf16-mixed" if self.uses_cuda() else "32-true")


# ---------------------------------------------------------------------------- evaluation
PROTOCOLS = ("progressive", "nonoverlapping", "sliding")  # clex/evaluate.py defines each


KEY = "{KEY}"  # marks each occurrence of the passkey in the needle and question texts
PASSKEY_NEEDLE = "\n# The pass key is {KEY}. Remember it. {KEY} is the pass key.\n"
PASSKEY_QUESTION = "\n# What is the pass key? The pass key is {KEY}"  # ends with the key: the answer


PASSKEY_TRAINING_KEYS = ("train_fraction", "digits", "needle", "question")  # what a fine-tune's passkey mix uses


def check_passkey_template(needle: str, question: str) -> None:
    """ValueError unless the needle holds {KEY} and the question ends with it, once."""
    if KEY not in needle:
        raise ValueError(f"passkey.needle: {needle!r} has no {KEY}; allowed: text with {KEY} at least once")
    if not question.endswith(KEY) or question.count(KEY) != 1:
        raise ValueError(f"passkey.question: {question!r}; allowed: text that ends with {KEY}, once")


class PasskeyConfig(Strict):
    """Passkey retrieval (docs/method.md §8 / issue 3): a random key hidden in test-corpus filler, scored by
    teacher-forced digit accuracy; `train_fraction` of every fine-tune's sequences are passkey examples
    at training length, the same for every experiment, so that a small model learns the format."""

    train_fraction: float = Field(0.1, ge=0, lt=1, description="share of fine-tuning sequences")
    digits: int = Field(5, ge=1, le=16)
    depths: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], min_length=1, description="needle depth in the filler")
    samples: int = Field(4, ge=1, description="examples per length and depth (the same for every model)")
    seed: int = 0
    needle: str = Field(PASSKEY_NEEDLE, description="hidden in the filler; {KEY} marks each occurrence of the key")
    question: str = Field(PASSKEY_QUESTION, description="ends the example with the key")

    @model_validator(mode="after")
    def _depths(self) -> "PasskeyConfig":
        if any(not 0 <= d <= 1 for d in self.depths) or sorted(set(self.depths)) != self.depths:
            raise ValueError(f"passkey.depths: {self.depths}; allowed: distinct increasing fractions in [0, 1]")
        check_passkey_template(self.needle, self.question)
        return self


class EvalConfig(Strict):
    """Perplexity by length; every length is scored on the same tokens (the first max(lengths) of each doc),
    under every protocol of `protocols` (the first is the primary one: passkey retrieval uses its forward),
    on the test documents and on `val_windows` fixed validation windows (validation PPL, to choose recipes)."""

    lengths: list[Annotated[int, Field(ge=1)]] = Field([128, 256, 512, 1024, 2048], min_length=1)
    protocols: list[Literal[PROTOCOLS]] = Field(  # type: ignore[valid-type]
        ["progressive", "nonoverlapping"], min_length=1, description="distinct; the first is the primary protocol")
    stride: int | None = Field(None, ge=1, description="sliding protocol: tokens scored per window")
    batch_size: int = Field(4, ge=1)
    val_windows: int = Field(8, ge=1, description="validation windows of max(lengths) tokens from val.bin")

    @model_validator(mode="after")
    def _distinct_protocols(self) -> "EvalConfig":
        if len(set(self.protocols)) != len(self.protocols):
            raise ValueError(f"eval.protocols: {self.protocols} has duplicates; "
                             f"allowed: distinct protocols of {list(PROTOCOLS)}")
        return self


# ---------------------------------------------------------------------------- sweeps
def _check_range(key: str, value: list | None, ok, allowed: str) -> None:
    if value is not None and not (len(value) == 2 and value[0] <= value[1] and ok(value)):
        raise ValueError(f"sweep.{key}: {value}; allowed: [low, high], {allowed}")


class SweepConfig(Strict):
    """`clex sweep` (stage `sweeps/<name>`): an Optuna study over the ODE width λ and t_max of `experiment`.

    Every trial fine-tunes from the shared base model with the `finetune` budget and seed `seed`; the
    objective is the mean validation PPL at `val_multipliers` × L on validation documents (never the test set).
    """

    name: str = Field("ode_width_tmax", pattern=r"^[A-Za-z0-9_.-]+$", description="Optuna study name; stage sweeps/<name>")
    experiment: str = Field("clex", description="a CLEX experiment; its rope.ode_width and rope.t_max are searched")
    trials: int = Field(8, ge=1, description="finished (complete or pruned) trials the study should hold; a rerun adds the missing ones")
    ode_width: list[int] = Field([1, 8], description="[low, high] of λ, integers, log-uniform")
    t_max: list[int] = Field([4, 32], description="[low, high] of t_max, integers, log-uniform")
    lr: list[float] | None = Field(None, description="[low, high] of finetune.lr, log-uniform; null keeps finetune.lr")
    val_multipliers: list[int] = Field([2, 4, 8], min_length=1, description="objective lengths, multiples of L")
    val_windows: int = Field(8, ge=1, description="validation windows per length")
    val_every_n_steps: int = Field(50, ge=1, description="intermediate objective (pruning) every this many steps")
    seed: int = Field(0, description="fine-tune seed of every trial; the sampler's seed")
    sampler: Literal["tpe", "random"] = "tpe"
    startup_trials: int = Field(3, ge=0, description="trials drawn at random, and finished before any is pruned")
    prune_after_steps: int = Field(50, ge=0, description="MedianPruner warm-up: no trial is pruned before this step")
    workers: int = Field(1, ge=1, description="worker processes of one `clex sweep` (more commands may share the storage)")
    storage: str | None = Field(None, description="database URL; null: sqlite:///<root>/build/sweeps/<name>.db")

    @model_validator(mode="after")
    def _ranges(self) -> "SweepConfig":
        _check_range("ode_width", self.ode_width, lambda v: v[0] >= 1, "integers 1 <= low <= high")
        _check_range("t_max", self.t_max, lambda v: v[0] >= 1 and v[1] >= 2, "integers 1 <= low <= high, high >= 2")
        _check_range("lr", self.lr, lambda v: 0 < v[0] and v[1] <= 1, "floats 0 < low <= high <= 1")
        if any(m < 1 for m in self.val_multipliers) or sorted(set(self.val_multipliers)) != self.val_multipliers:
            raise ValueError(f"sweep.val_multipliers: {self.val_multipliers}; allowed: distinct increasing integers >= 1")
        return self


# ---------------------------------------------------------------------------- experiments
# Each position encoding's spec (its `rope:` keys, defaults and checks) lives beside its module in clex/rope/ and
# is registered there; `rope` is the discriminated union over `type` of every registered spec. The spec classes
# that other modules import from here (RopeSpec, ClexSpec, SolverSpec) are re-exported above.
PositionSpec = position_spec()


class StreamingSpec(Strict):
    """StreamingLLM-style evaluation (docs/method.md §8): each query sees the first `sinks` tokens and the
    `window` most recent ones, positions assigned inside that cache. The sizes are ratios of L, scaled
    from the review thread's window 4000 and 64 sinks at LLaMA-2's L = 4096."""

    window_ratio: float = Field(4000 / 4096, gt=0, le=1, description="window = round(ratio·L) tokens")
    sink_ratio: float = Field(64 / 4096, ge=0, lt=1, description="sinks = max(1, round(ratio·L)) tokens")

    def sizes(self, train_len: int) -> tuple[int, int]:
        """(window, sinks) in tokens for training length L."""
        return max(1, round(self.window_ratio * train_len)), max(1, round(self.sink_ratio * train_len))


def _listed(names: list[str]) -> str:
    """"'a', 'b' and 'c'": a few values in a message."""
    quoted = [repr(n) for n in names]
    return " and ".join(filter(None, [", ".join(quoted[:-1]), quoted[-1]]))


class Experiment(Strict):
    """A named variant (experiments/<name>.yaml) fine-tuned from the shared base model, or, with `reuse`,
    evaluated on the checkpoints of another experiment whose fine-tune is the same (load_study checks that
    they differ only in knobs that act at inference: `Study.training_difference`)."""

    name: str
    description: str = ""
    rope: PositionSpec
    position_sampling: Literal["none", "random", "uniform"] = "none"
    attn_log_scale: bool = Field(False, description="queries times ln(n)/ln(L) for n > L (docs/method.md §3.7)")
    reuse: str | None = Field(None, description="evaluate this experiment's checkpoints (same seed; it must train "
                                                "identically); no fine-tuning")
    streaming: StreamingSpec | None = Field(None, description="evaluate with a StreamingLLM window + sinks")
    finetune: dict | None = Field(None, description="overrides of params.yaml finetune keys (not seeds); "
                                                    "validated by load_study, merged by Study.finetune_config")

    @model_validator(mode="after")
    def _sampling_needs_scale(self) -> "Experiment":
        if self.position_sampling != "none" and getattr(self.rope, "t_max", None) is None:
            raise ValueError(
                f"position_sampling: {self.position_sampling!r} needs a scaling factor t; "
                f"allowed with rope.type {self.rope.type!r}: 'none' (use rope.type 'clex' for random/uniform)"
            )
        encoding = REGISTRY[self.rope.type]  # its traits: class attributes of the module (clex/rope/base.py)
        if self.streaming is not None and not encoding.rotary:
            raise ValueError(f"streaming: needs a rotary encoding, not rope.type {self.rope.type!r}; allowed: any "
                             f"rope.type except {_listed(types_with('rotary', False))}")
        return self

    @property
    def t_max(self) -> int | None:
        return getattr(self.rope, "t_max", None)


def hf_refusal(exp: Experiment, attn_implementation: str = "auto") -> str | None:
    """Why a Hugging Face model (clex/hf.py) cannot run experiment `exp`, as 'key: value; allowed: ...' (None: it
    can): HF attention takes no query scale and has no StreamingLLM window, and flash-attention takes no bias mask."""
    if exp.attn_log_scale:
        return "attn_log_scale: true; allowed with model.source 'hf': false (HF attention takes no query scale)"
    if exp.streaming is not None:
        return ("streaming: a StreamingLLM window; allowed with model.source 'hf': no streaming key (no HF "
                "counterpart)")
    if attn_implementation == "flash_attention_2" and not REGISTRY[exp.rope.type].rotary:
        return (f"rope.type: {exp.rope.type!r} adds an attention bias, which model.attn_implementation "
                "'flash_attention_2' cannot take; allowed: a rotary rope.type, or attn_implementation auto, sdpa or eager")
    return None


def _rebuild_position_spec() -> None:
    """An encoding registered after this module was imported (a test's) joins `Experiment.rope`'s union."""
    global PositionSpec
    PositionSpec = position_spec()
    Experiment.model_fields["rope"].annotation = get_args(PositionSpec)[0]
    Experiment.model_rebuild(force=True)


on_change(_rebuild_position_spec)


class PaperNumbers(Strict):
    """Numbers the paper (or its review thread) reports for an experiment, by eval length label, and the
    evaluation protocol they were measured with: reports show them only beside our table of that protocol."""

    source: str
    protocol: Literal[PROTOCOLS] = Field(  # type: ignore[valid-type]
        "progressive", description="the protocol these numbers were measured with (official: progressive, docs/protocols.md)")
    lengths: list[str] = Field(description="the paper's labels, e.g. ['4k', '8k', '16k']")
    multipliers: list[int] = Field(description="the same lengths as multiples of the training length")
    ppl: dict[str, list[float | str | None]] = Field(
        description="our experiment name (or 'base') -> the paper's PPLs; null where the paper gives none")

    @model_validator(mode="after")
    def _aligned(self) -> "PaperNumbers":
        for name, row in self.ppl.items():
            if len(row) != len(self.lengths) or len(self.multipliers) != len(self.lengths):
                raise ValueError(f"paper.ppl.{name}: {row} must have one value per paper.lengths {self.lengths}")
        return self


class Ablation(Strict):
    """ablations/<name>/ablation.yaml: which experiments it compares and on which knob."""

    name: str
    question: str
    knob: str
    experiments: list[str] = Field(min_length=1)
    reference: str | None = Field(None, description="experiment the paired differences are taken against")
    paper: PaperNumbers | None = None


# ---------------------------------------------------------------------------- the whole study
class Params(Strict):
    """params.yaml."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()
    passkey: PasskeyConfig = PasskeyConfig()
    sweep: SweepConfig = SweepConfig()
    experiments: list[str] = Field(min_length=1, description="experiments the pipeline fine-tunes (DVC's finetune and "
                                                            "evaluate matrices iterate over this list)")
    reuse_experiments: list[str] = Field([], description="experiments evaluated on another's checkpoints (`reuse:`)")

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        L = self.model.train_len
        bad = [n for n in self.eval.lengths if n % L]
        if bad:
            raise ValueError(
                f"eval.lengths: {bad} are not multiples of model.train_len={L}; "
                f"allowed: positive multiples of {L}, e.g. {[L * m for m in (1, 2, 4, 8, 16)]}"
            )
        if len(set(self.eval.lengths)) != len(self.eval.lengths) or sorted(self.eval.lengths) != self.eval.lengths:
            raise ValueError(f"eval.lengths: {self.eval.lengths}; allowed: distinct, increasing multiples of {L}")
        if "sliding" in self.eval.protocols and self.eval.stride is None:
            raise ValueError("eval.stride: required when eval.protocols holds 'sliding' (tokens scored per window)")
        if self.eval.stride is not None and self.eval.stride > min(self.eval.lengths):
            raise ValueError(f"eval.stride: {self.eval.stride} exceeds the shortest eval length {min(self.eval.lengths)}")
        if self.finetune.steps % self.sweep.val_every_n_steps:
            raise ValueError(f"sweep.val_every_n_steps: {self.sweep.val_every_n_steps} does not divide finetune.steps="
                             f"{self.finetune.steps}; allowed: a divisor, so the last report is the trained model's objective")
        if self.sweep.prune_after_steps >= self.finetune.steps:
            raise ValueError(f"sweep.prune_after_steps: {self.sweep.prune_after_steps}; allowed: below "
                             f"finetune.steps={self.finetune.steps}")
        return self

    @property
    def max_eval_len(self) -> int:
        return max(self.eval.lengths)


class Study(BaseModel):
    """Everything a stage may need, validated together."""

    model_config = ConfigDict(frozen=True)
    root: Path
    params: Params
    experiments: dict[str, Experiment]
    ablations: dict[str, Ablation]

    def experiment(self, name: str) -> Experiment:
        if name not in self.experiments:
            raise ParamsError(
                f"experiment: {name!r} is unknown; allowed: {sorted(self.experiments)} (files in experiments/)"
            )
        return self.experiments[name]

    def finetune_config(self, name: str) -> FinetuneConfig:
        """params.yaml's `finetune` with experiment `name`'s `finetune:` overrides (validated by load_study)."""
        return _finetune_config(self.params.finetune, self.experiment(name))

    def checkpoint_of(self, name: str) -> str:
        """The experiment whose fine-tuned weights `name` evaluates (itself unless it reuses another's)."""
        return self.experiment(name).reuse or name

    def trained(self) -> list[str]:
        """The experiments the pipeline fine-tunes: params.yaml `experiments` (load_study: none reuses)."""
        return list(self.params.experiments)

    def evaluated(self) -> list[str]:
        """Every experiment the pipeline evaluates: the fine-tuned ones, then `reuse_experiments`."""
        return self.params.experiments + self.params.reuse_experiments

    def evaluate_stage(self, name: str, seed: int) -> str:
        """The DVC stage that evaluates `name` at `seed`: `evaluate@<name>-<seed>` (dvc.yaml's matrix), or for a
        reuse experiment `evaluate_on_<checkpoint>@<name>-<seed>` (the generated matrix of the experiments that
        evaluate that checkpoint: DVC cannot look up which experiment's checkpoint a name reads)."""
        group = "evaluate" if self.experiment(name).reuse is None else f"evaluate_on_{self.checkpoint_of(name)}"
        return f"{group}@{name}-{seed}"

    def finetune_inputs(self, experiment: "str | Experiment", optim: FinetuneConfig | None = None) -> dict:
        """Everything in the study's configuration that `experiment`'s fine-tuned weights depend on (a name, or a
        sweep trial's Experiment): the values of `finetune_param_keys()` (`optim`: the experiment's resolved
        `finetune`, or a sweep trial's) and the experiment's resolved settings under `exp` (flattened, the names of
        its MLflow params). The one definition behind the finetune stages' DVC params, the resume hash (with seed,
        data hash and base checkpoint), the fine-tune's MLflow params and the sweep's settings."""
        exp = self.experiment(experiment) if isinstance(experiment, str) else experiment
        p, optim = self.params, optim or _finetune_config(self.params.finetune, exp)
        return {"model": p.model.model_dump(), "finetune": optim.model_dump(exclude={"seeds"}),
                "trainer": p.trainer.model_dump(), "passkey": p.passkey.model_dump(include=set(PASSKEY_TRAINING_KEYS)),
                "exp": exp.model_dump(exclude={"description"})}

    def training_difference(self, name: str, source: str) -> list[str]:
        """Where `name`'s fine-tune would differ from `source`'s, as 'key: value vs value' lines ([]: `name` may
        evaluate `source`'s checkpoints, `reuse: <source>`). The resolved `finetune` section is compared, not the
        experiments' `finetune:` overrides. Knobs that act only at inference are left out: name, reuse, streaming,
        attn_log_scale at fine-tuning length N = L (finetune.seq_len_factor 1: it scales queries beyond L only),
        and an inference-time rope.type of `name` (rope, dynamic_ntk: compared as the plain 'rope' it evaluates)."""
        def training(e: str) -> dict:
            inputs = self.finetune_inputs(e)
            exp = {k: v for k, v in inputs["exp"].items() if k not in ("name", "reuse", "streaming", "finetune")}
            if inputs["finetune"]["seq_len_factor"] == 1:
                exp.pop("attn_log_scale")
            return {**inputs, "exp": exp}

        mine = training(name)
        if REGISTRY[mine["exp"]["rope"]["type"]].inference_only:
            mine["exp"]["rope"] = {"type": "rope"}
        return _differences(mine, training(source))

    def ablation(self, name: str) -> Ablation:
        if name not in self.ablations:
            raise ParamsError(f"ablation: {name!r} is unknown; allowed: {sorted(self.ablations)}")
        return self.ablations[name]


def _differences(a, b, key: str = "") -> list[str]:
    """'key: a vs b' for every dotted key whose value differs between the nested mappings a and b."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.get("type") != b.get("type"):  # two kinds of position encoding: their fields do not compare
            return [f"{key}type: {a.get('type')!r} vs {b.get('type')!r}"]
        return [d for k in sorted(a.keys() | b.keys()) for d in _differences(a.get(k), b.get(k), f"{key}{k}.")]
    return [] if a == b else [f"{key.rstrip('.')}: {a!r} vs {b!r}"]


def finetune_param_keys() -> list[str]:
    """The params.yaml keys a fine-tune reads (`Study.finetune_inputs` holds their values): the finetune
    stages and the sweep track exactly these in DVC."""
    return ([f"model.{k}" for k in ModelConfig.model_fields]
            + [f"finetune.{k}" for k in FinetuneConfig.model_fields if k != "seeds"]
            + [f"trainer.{k}" for k in TrainerConfig.model_fields] + [f"passkey.{k}" for k in PASSKEY_TRAINING_KEYS])


# ---------------------------------------------------------------------------- loading
def _union_tags(union) -> set[str]:
    """The discriminator values of a tagged union (pydantic puts the tag into an error's location)."""
    members = get_args(get_args(union)[0])
    return {tag for m in members for tag in get_args(m.model_fields["type"].annotation)}


def _key(loc: tuple) -> str:
    """'rope.t_max', not pydantic's 'rope.clex.t_max': drop the union tag after a 'rope' key."""
    tags = _union_tags(PositionSpec)
    return ".".join(str(p) for i, p in enumerate(loc) if not (i and loc[i - 1] == "rope" and p in tags))


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = _key(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "value_error":  # our own validators already name key, value and what is allowed
            lines.append(f"{source}: {msg}")
        else:
            shown = "(missing)" if e["type"] == "missing" else repr(e.get("input"))
            lines.append(f"{source}: {key}: got {shown}; {msg}")
    return "\n".join(lines)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"line {line}: duplicate key {key!r} (first at line {first}); allowed: each key once per mapping")


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping: PyYAML would keep the last one silently
    (and DVC, reading the same params.yaml, refuses it), so a study would run on a value its author did not see."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in first:
                    raise DuplicateKeyError(key, key_node.start_mark.line + 1, first[key])
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml_text(path: Path):
    """A YAML file's content (UniqueKeyLoader); ParamsError naming the file for a missing, non-UTF-8 or bad file."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: byte {e.object[e.start:e.start + 1]!r} at offset {e.start} is not UTF-8; "
                          "allowed: a UTF-8 encoded YAML file") from None
    except DuplicateKeyError as e:
        raise ParamsError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None


def _read_yaml(path: Path) -> dict:
    data = read_yaml_text(path)
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def merged(base: dict, override: dict) -> dict:
    """base with override's keys replaced, recursively into nested mappings (experiment `extends`,
    and the tests' tiny profile over params.yaml)."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _experiment_yaml(path: Path, seen: tuple = ()) -> dict:
    """An experiment's YAML; `extends: <name>` starts from experiments/<name>.yaml and overrides keys
    (nested mappings merge), so a variant that flips one knob states only that knob."""
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    source = f"experiments/{path.name}"
    siblings = sorted(p.stem for p in path.parent.glob("*.yaml"))
    if parent not in siblings:  # a name, never a path such as ../params
        raise ParamsError(f"{source}: extends: got {parent!r}; allowed: one of {[s for s in siblings if s != path.stem]}")
    chain = seen + (path.stem,)
    if parent in chain:
        raise ParamsError(f"{source}: extends: {parent!r} makes a cycle ({' -> '.join(chain + (parent,))})")
    base = _experiment_yaml(path.with_name(f"{parent}.yaml"), chain)
    base.pop("description", None)
    return merged(base, data)


def _validate(cls, data: dict, source: str, context: dict | None = None):
    try:
        return cls.model_validate(data, context=context)
    except ValidationError as e:
        raise ParamsError(_format(e, source)) from None


class _FinetuneOverrides(Strict):
    """Wraps a merged finetune mapping so that its errors read `finetune.<key>`."""

    finetune: FinetuneConfig


def _finetune_config(base: FinetuneConfig, exp: Experiment) -> FinetuneConfig:
    """`base` with the experiment's `finetune:` overrides, validated; errors name experiments/<name>.yaml."""
    if not exp.finetune:
        return base
    source = f"experiments/{exp.name}.yaml"
    if "seeds" in exp.finetune:
        raise ParamsError(f"{source}: finetune.seeds: {exp.finetune['seeds']}; allowed: every finetune key but seeds "
                          "(all experiments share params.yaml finetune.seeds)")
    return _validate(_FinetuneOverrides, {"finetune": merged(base.model_dump(), exp.finetune)}, source).finetune


def load_study(root: Path | str = ".", params_file: str = "params.yaml") -> Study:
    """Read and cross-validate params.yaml, experiments/*.yaml and ablations/*/ablation.yaml. With
    `model.source: hf`, experiments a Hugging Face model cannot run (`hf_refusal`) may not be listed in
    `experiments` or `reuse_experiments`, and ablations that compare one are left out of the study."""
    root = Path(root).resolve()
    params = _validate(Params, _read_yaml(root / params_file), params_file, {"root": root})
    corpus = params.data.tracked_corpus(root)
    if corpus is not None and root.is_relative_to((root / corpus).resolve()):
        key = "data.files" if params.data.source == "files" else "data.hf_name"
        raise ParamsError(f"{params_file}: {key}: {getattr(params.data, key[5:])!r} is rooted at {corpus!r}, which "
                          "holds the study itself (its outputs in build/); allowed: a path under a corpus folder, e.g. "
                          "'corpus/**/*.txt', which DVC tracks as the prepare stage's dependency")
    experiments = {
        p.stem: _validate(Experiment, {"name": p.stem, **_experiment_yaml(p)}, f"experiments/{p.name}")
        for p in sorted((root / "experiments").glob("*.yaml"))
    }
    for name, exp in experiments.items():
        factor, n = getattr(exp.rope, "max_position_factor", None), _finetune_config(params.finetune, exp).seq_len_factor
        if factor is not None and factor < n:
            raise ParamsError(
                f"experiments/{name}.yaml: rope.max_position_factor: {factor} is below finetune.seq_len_factor={n}; "
                f"allowed: >= {n} (M = factor·L positions must hold the N = {n}·L training tokens)"
            )
    _check_experiment_lists(params, experiments, params_file)
    hf = params.model.source == "hf"
    if hf:
        for key in ("experiments", "reuse_experiments"):
            for name in getattr(params, key):
                why = hf_refusal(experiments[name], params.model.attn_implementation)
                if why:
                    raise ParamsError(f"{params_file}: {key}: {name!r} cannot run on a Hugging Face model "
                                      f"(experiments/{name}.yaml {why}); allowed: leave it out of {key} when "
                                      "model.source is 'hf'")
    swept = params.sweep.experiment
    if swept not in experiments or experiments[swept].rope.type != "clex":
        raise ParamsError(f"{params_file}: sweep.experiment: {swept!r} is not a CLEX experiment; allowed: "
                          f"{sorted(n for n, e in experiments.items() if e.rope.type == 'clex')}")
    steps = _finetune_config(params.finetune, experiments[swept]).steps  # the trials' budget
    if steps % params.sweep.val_every_n_steps or params.sweep.prune_after_steps >= steps:
        raise ParamsError(f"experiments/{swept}.yaml: finetune.steps: {steps} (the sweep's trials); allowed: a multiple "
                          f"of sweep.val_every_n_steps={params.sweep.val_every_n_steps}, above sweep.prune_after_steps="
                          f"{params.sweep.prune_after_steps}")
    ablations, evaluated = {}, params.experiments + params.reuse_experiments
    for p in sorted((root / "ablations").glob("*/ablation.yaml")):
        source = str(p.relative_to(root))
        ab = _validate(Ablation, {"name": p.parent.name, **_read_yaml(p)}, source)
        if hf and any(hf_refusal(experiments[e], params.model.attn_implementation)
                      for e in ab.experiments if e in experiments):
            continue  # it compares a knob a Hugging Face model does not have: not part of an hf study
        missing = [e for e in ab.experiments + [ab.reference or ab.experiments[0]] if e not in evaluated]
        if missing:
            raise ParamsError(
                f"{source}: experiments: {missing} are not evaluated by the pipeline; "
                f"allowed: names listed in {params_file} experiments or reuse_experiments {evaluated}"
            )
        ablations[ab.name] = ab
    study = Study(root=root, params=params, experiments=experiments, ablations=ablations)
    for name in params.reuse_experiments:
        differ = study.training_difference(name, experiments[name].reuse)
        if differ:
            raise ParamsError(
                f"experiments/{name}.yaml: reuse: {experiments[name].reuse!r} trains differently ({name} vs it): "
                f"{'; '.join(differ)}; allowed: an experiment whose fine-tune is the same except name, description, "
                "reuse, streaming, attn_log_scale at finetune.seq_len_factor 1, and an inference-time rope.type "
                f"{types_with('inference_only')} (compared as the plain 'rope' whose checkpoint it evaluates)")
    return study


def _check_experiment_lists(params: Params, experiments: dict, params_file: str) -> None:
    """params.yaml `experiments` name fine-tuned experiments (no `reuse:`), `reuse_experiments` the ones that
    reuse one of those: each name once, each with its experiments/<name>.yaml."""
    lists = {"experiments": params.experiments, "reuse_experiments": params.reuse_experiments}
    for key, names in lists.items():
        for i, name in enumerate(names):
            if name not in experiments:
                raise ParamsError(f"{params_file}: {key}[{i}]: {name!r} is unknown; allowed: {sorted(experiments)} "
                                  "(one experiments/<name>.yaml each)")
    listed = params.experiments + params.reuse_experiments
    twice = sorted({n for n in listed if listed.count(n) > 1})
    if twice:
        raise ParamsError(f"{params_file}: experiments, reuse_experiments: {twice} listed more than once; allowed: "
                          "each experiment once")
    for name in params.experiments:
        if experiments[name].reuse is not None:
            raise ParamsError(f"{params_file}: experiments: {name!r} reuses {experiments[name].reuse!r}'s checkpoints "
                              f"(experiments/{name}.yaml reuse:); allowed: fine-tuned experiments; list it under "
                              "reuse_experiments")
    for name in params.reuse_experiments:
        source = experiments[name].reuse
        if source is None:
            raise ParamsError(f"{params_file}: reuse_experiments: {name!r} has no reuse: in experiments/{name}.yaml; "
                              "allowed: experiments that evaluate another's checkpoints; list it under experiments")
        if source not in params.experiments:
            raise ParamsError(f"experiments/{name}.yaml: reuse: {source!r} is not a fine-tuned experiment of the "
                              f"pipeline; allowed: {params.experiments} ({params_file} experiments)")
