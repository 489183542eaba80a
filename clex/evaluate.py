"""Perplexity by length under named protocols, one MLflow run per protocol.

Every length is scored on the same test documents, each cut to the longest eval length, so a change
of PPL with length is a change of context, not of text; and on `eval.val_windows` fixed windows of the
validation split (validation PPL, the one to choose recipes by: never the test PPL). An experiment with
`reuse:` (Dynamic NTK, the StreamingLLM window) is evaluated on the reused experiment's checkpoint of the same seed.

Passkey retrieval (clex/passkey.py) runs at every eval length on the same examples for every model:
teacher-forced digit accuracy and exact-match share, overall and per needle depth, with the forward of
the primary protocol (the first of `eval.protocols`), keeping only the logits at the answer rows (`rows_of`).

Protocols (`eval.protocols`; each run's `eval_protocol` tag, printed in every report):
- progressive (the official CLEX evaluation, docs/method.md §5 and §3.6): the windows of `nonoverlapping`, each
  fed in chunks of L = model.train_len tokens through a KV cache that keeps keys un-rotated
  (`clex.model.KVCache`). Before chunk j (0-based) runs, the context holds (j+1)·L tokens, so the chunk runs
  at t = inference_t((j+1)·L) (j+1 capped at t_max for CLEX, (j+1) for Dynamic NTK), every cached key is
  re-rotated with θ(t) at its own position, and the attention log scale and the streaming window follow
  the same context length. A length-n PPL thus averages over t = 1..ceil(n/L). Each chunk is scored as it
  comes, through a cache sized for the window, so memory is bounded by the cache (docs/protocols.md, "Memory").
  Every prediction is scored once: the first token of chunk j is predicted by the last position of chunk j-1,
  at that chunk's t. The official code drops that prediction (HF's shifted loss inside each chunk); `official`
  in the detail holds the PPL scored that way too.
- nonoverlapping: each document is cut into consecutive windows of n tokens, each run in one forward at
  t = ceil(n/L) (capped at t_max); every prediction inside a window is scored (the first token of a
  window has no context and is not predicted), including those with short context.
- sliding: windows of n tokens advanced by `eval.stride`; the first window scores all its predictions,
  later ones only their last `stride` (each token scored once, with at least n - stride tokens of context).

A NaN or infinite PPL, NLL or passkey score stops the stage (`NonFiniteError`, exit 2) before any MLflow run
is created or the eval JSON written, naming the run, split, length and the likely cause (a non-finite tensor
of the checkpoint, a non-finite θ(t) table, or else an overflow in the forward).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from clex import layout, tracking
from clex.checkpoint import checkpoint_path, checkpoint_source, for_inference, load_checkpoint
from clex.config import EvalConfig, Experiment, NonFiniteError, ParamsError, Study
from clex.data import FixedWindows, data_hash, load_test_docs, load_tokens
from clex.io import atomic_file
from clex.passkey import eval_set, passkey_accuracy, passkey_format


def windows(total: int, length: int, protocol: str, stride: int | None) -> list[tuple[int, int]]:
    """(start, first scored prediction index within the window) for one document of `total` tokens."""
    if protocol in ("nonoverlapping", "progressive"):
        return [(s, 0) for s in range(0, total - length + 1, length)]
    starts = list(range(0, total - length + 1, stride))
    return [(s, 0 if i == 0 else length - 1 - stride) for i, s in enumerate(starts)]


def logit_chunks(model, tokens: torch.Tensor, chunk: int | None = None, cache=None) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, logits (B, c, V) of tokens[:, start:start + c]) for (B, T) tokens fed in chunks of `chunk` (default L)
    tokens through `cache` (default: a fresh cache sized for T tokens; generation passes its own and continues
    from it). Only one chunk's logits exist at a time unless the caller keeps them."""
    chunk = chunk or model.cfg.train_len
    cache = model.new_cache(tokens.shape[1]) if cache is None else cache
    for s in range(0, tokens.shape[1], chunk):
        yield s, model(tokens[:, s:s + chunk], cache=cache)


def progressive_logits(model, tokens: torch.Tensor, chunk: int | None = None, cache=None) -> torch.Tensor:
    """Logits (B, T, V) of (B, T) tokens fed in chunks through a cache (`logit_chunks`); all of them at once."""
    return torch.cat([logits for _, logits in logit_chunks(model, tokens, chunk, cache)], 1)


def forward_of(model, protocol: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """tokens -> logits as `protocol` runs the model: chunked through the cache, or one forward."""
    return partial(progressive_logits, model) if protocol == "progressive" else model


def chunks_of(model, protocol: str) -> Callable[[torch.Tensor], Iterable[tuple[int, torch.Tensor]]]:
    """tokens -> (start, logits) pieces as `protocol` runs the model: chunk by chunk through a cache sized for the
    window (`logit_chunks`), or one piece, the one forward."""
    if protocol == "progressive":
        return partial(logit_chunks, model)
    return lambda tokens: [(0, model(tokens))]


def token_nll(pieces: Iterable[tuple[int, torch.Tensor]], tokens: torch.Tensor) -> torch.Tensor:
    """Float32 NLL (B, T-1) of tokens 1..T-1 of (B, T) `tokens`, row i predicted by position i, from (start, logits)
    pieces (`chunks_of`) scored one at a time: no more than one piece's logits are held. The numbers are those of
    one cross-entropy over all logits (each row's log-softmax is its own)."""
    losses = []
    for s, logits in pieces:
        target = tokens[:, s + 1:s + 1 + logits.shape[1]]  # the last position of the window predicts nothing
        losses.append(F.cross_entropy(logits[:, :target.shape[1]].float().transpose(1, 2), target, reduction="none"))
        del logits  # before the next piece is computed
    return torch.cat(losses, 1)


def rows_of(model, protocol: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(tokens, rows) -> the logits at `rows` as `protocol` runs the model (`logits_at`): passkey scoring."""
    pieces = chunks_of(model, protocol)
    return lambda tokens, rows: logits_at(pieces(tokens), rows)


def logits_at(pieces: Iterable[tuple[int, torch.Tensor]], rows: torch.Tensor) -> torch.Tensor:
    """Logits (B, k, V) at positions `rows` (B, k) from (start, logits) pieces (`chunks_of`), each piece read as it
    comes: passkey scoring reads only the answer positions."""
    out = None
    for s, logits in pieces:
        if out is None:
            out = logits.new_empty(*rows.shape, logits.shape[-1])
        inside = (rows >= s) & (rows < s + logits.shape[1])
        b, _ = inside.nonzero(as_tuple=True)
        out[inside] = logits[b, rows[inside] - s]
        del logits  # before the next piece is computed
    return out


@torch.inference_mode()
def perplexity(model, docs: torch.Tensor, length: int, cfg: EvalConfig, protocol: str) -> dict:
    """Summed NLL, scored-token count and PPL of `model` on (n_docs, max_len) tokens at window `length`.

    `t` is the model's t for the whole window; progressive adds `t_chunks` (chunk j's t) and `official`
    (the scoring of the official code, without the first prediction of every chunk after the first).
    """
    model.eval()
    device = next(model.parameters()).device
    pieces, L = chunks_of(model, protocol), model.cfg.train_len
    items = [(d, s, first) for d in range(docs.shape[0]) for s, first in windows(docs.shape[1], length, protocol, cfg.stride)]
    nll, count, boundary_nll, boundary = 0.0, 0, 0.0, 0
    for i in range(0, len(items), cfg.batch_size):
        chunk = items[i:i + cfg.batch_size]
        batch = torch.stack([docs[d, s:s + length] for d, s, _ in chunk]).to(device).long()
        losses = token_nll(pieces(batch), batch)  # (B, length-1); the model sees all `length` tokens, as officially
        for row, (_, _, first) in zip(losses, chunk):
            nll += row[first:].double().sum().item()
            count += row.shape[0] - first
            if protocol == "progressive":  # row jL-1 predicts token jL, the first of chunk j >= 1
                boundary_nll += row[L - 1::L].double().sum().item()
                boundary += row[L - 1::L].numel()
    out = {"nll": nll, "tokens": count, "ppl": _ppl(nll, count), "t": model.context_t(length)}
    if protocol == "progressive":
        out["t_chunks"] = [model.context_t(min(length, (j + 1) * L)) for j in range(math.ceil(length / L))]
        official = (nll - boundary_nll, count - boundary)
        out["official"] = {"nll": official[0], "tokens": official[1], "ppl": _ppl(*official)}
    return out


def _ppl(nll: float, tokens: int) -> float:
    """exp(mean NLL); inf where that overflows a float (math.exp would raise), so the non-finite check names it."""
    try:
        return math.exp(nll / tokens)
    except OverflowError:
        return math.inf


def _numbers(d: dict, prefix: str = ""):
    """(dotted key, value) of every float in a nested result dict."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _numbers(v, f"{prefix}{k}.")
        elif isinstance(v, float):
            yield f"{prefix}{k}", v


def nonfinite_cause(model, ckpt: Path) -> str:
    """The likely cause of a non-finite result: the checkpoint's (`ckpt`: a file or a Hugging Face folder, named in
    the message) non-finite tensors (by name), a non-finite
    θ(t) table of the position encoding, or, with both finite, an overflow in the forward."""
    bad = [(k, int((~torch.isfinite(v)).sum())) for k, v in model.state_dict().items()
           if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        return f"the checkpoint {ckpt} holds non-finite weights: {bad[0][0]} ({bad[0][1]} NaN/inf values){more}"
    with torch.no_grad():
        table = model.rope.frequency_table()
    if not torch.isfinite(table).all():
        t = int(torch.nonzero(~torch.isfinite(table))[0, 0]) + 1
        return f"the position encoding's θ(t) table is non-finite from t = {t} (the checkpoint's weights are finite)"
    return "an overflow in the forward at this length (the checkpoint's weights and θ(t) table are finite)"


def check_finite(scores: dict, passkey: dict, model, ckpt: Path, stage: str, exp: str, seed: int, primary: str,
                 trained_by: str) -> None:
    """NonFiniteError naming the run (stage, experiment, seed, protocol), the split, the length, the likely
    cause and the training stage that wrote the checkpoint, for the first NaN or infinite PPL, NLL or passkey
    score; nothing is logged or written before this."""
    found = [(protocol, split, n, key, v) for protocol, by_split in scores.items() for split, by_n in by_split.items()
             for n, r in by_n.items() for key, v in _numbers(r) if not math.isfinite(v)]
    found += [(primary, "passkey", n, key, v) for n, r in passkey.items() for key, v in _numbers(r) if not math.isfinite(v)]
    if found:
        protocol, split, n, key, v = found[0]
        raise NonFiniteError(
            f"{stage} (experiment {exp}, seed {seed}, protocol {protocol}): {split} {key} at length {n} is {v} "
            f"({len(found)} non-finite values in all); likely cause: {nonfinite_cause(model, ckpt)}. Nothing was "
            f"logged or written. Fix: if the file was damaged, `dvc repro --force {trained_by}`; if that training "
            "diverged, change its recipe (e.g. a lower lr)")


def validation_windows(study: Study) -> torch.Tensor:
    """(eval.val_windows, max(eval.lengths)) tokens: evenly spaced windows of the validation split."""
    n, k = study.params.max_eval_len, study.params.eval.val_windows
    tokens = load_tokens(layout.data_dir(study.root), "val")
    if tokens.size <= n + 1:
        raise ParamsError(f"eval.lengths: max {n} exceeds the {tokens.size} validation tokens; allowed: shorter "
                          "lengths or a larger data.val_fraction")
    fixed = FixedWindows(tokens, n, k)
    return torch.stack([fixed[i][:n] for i in range(k)])


def evaluate(study: Study, experiment: str, seed: int | None = None) -> Path:
    """Evaluate the base model (experiment 'base') or one fine-tuned run; writes the eval JSON."""
    p = study.params
    exp, src, seed = checkpoint_source(study, experiment, seed)
    stage = "evaluate_base" if experiment == "base" else study.evaluate_stage(experiment, seed)
    fmt = passkey_format(study, min(p.eval.lengths), "the shortest of eval.lengths")
    trained = json.loads((src / "run.json").read_text())
    ckpt = checkpoint_path(study, src)  # model.pt, a Hugging Face fine-tune's hf/ folder or the adopted checkpoint
    # on the training device and precision (the GPU profile's evaluations would take hours on the CPU)
    model, precision, placement = for_inference(study, load_checkpoint(study, exp, ckpt))
    test_docs, _ = load_test_docs(layout.data_dir(study.root))
    sets = {"test": torch.from_numpy(test_docs[:, : p.max_eval_len].astype("int64")), "val": validation_windows(study)}
    primary = p.eval.protocols[0]
    with precision:
        scores = {protocol: {name: {n: perplexity(model, docs, n, p.eval, protocol) for n in p.eval.lengths}
                             for name, docs in sets.items()} for protocol in p.eval.protocols}
        logits_at = rows_of(model, primary)
        passkey = {n: passkey_accuracy(model, *eval_set(fmt, test_docs, n, p.passkey.depths, p.passkey.samples,
                                                        p.passkey.seed), p.passkey.depths, p.eval.batch_size, logits_at)
                   for n in p.eval.lengths}
    trained_by = "pretrain" if experiment == "base" else tracking.stage_name("finetune", study.checkpoint_of(experiment), seed)
    check_finite(scores, passkey, model, ckpt, stage, exp.name, seed, primary, trained_by)

    def ppl(protocol: str, split: str) -> dict:
        return {str(n): r["ppl"] for n, r in scores[protocol][split].items()}

    record = {
        "experiment": exp.name, "seed": seed, "n_docs": int(sets["test"].shape[0]), "val_windows": p.eval.val_windows,
        "train_run_id": trained["run_id"], "checkpoint_sha256": trained["checkpoint_sha256"],
        "data_hash": data_hash(layout.data_dir(study.root)), "reused_checkpoint_of": exp.reuse, "stride": p.eval.stride,
        **placement,
        "primary": primary, "run_id": None, "protocol": primary, "ppl": ppl(primary, "test"),
        "protocols": {protocol: {"run_id": None, "ppl": ppl(protocol, "test"), "val_ppl": ppl(protocol, "val"),
                                 "detail": {split: {str(n): r for n, r in by_n.items()} for split, by_n in s.items()}}
                      for protocol, s in scores.items()},
        "passkey": {str(n): r for n, r in passkey.items()},
    }
    return _track(study, exp, seed, stage, src, trained["run_id"], record)


def _metrics(entry: dict, passkey: dict | None) -> list[tuple[str, float, int]]:
    """(key, value, step) of one protocol's run: ppl and val_ppl with step = length (the compare view's
    PPL-vs-length curves) and per length; the primary run also the passkey metrics."""
    out = []
    for key in ("ppl", "val_ppl"):
        for n, v in entry[key].items():
            out += [(key, v, int(n)), (f"{key}_{n}", v, 0)]
    for n, r in (passkey or {}).items():  # passkey retrieval, logged like PPL (step = length)
        out += [("passkey_acc", r["digit_acc"], int(n)), ("passkey_exact", r["exact"], int(n))]
        out += [(f"passkey_acc_{n}_depth{depth}", d["digit_acc"], 0) for depth, d in r["by_depth"].items()]
    return out


def _track(study: Study, exp: Experiment, seed: int, stage: str, src: Path, train_run_id: str, record: dict) -> Path:
    """One MLflow run per protocol, nested under the run that trained the checkpoint; every run carries the
    eval record (artifact eval/<name>.json), which is then moved into place (the stage's output) before the
    runs close: FINISHED, or all FAILED when anything fails."""
    root, p = study.root, study.params
    tracking.close_stale_runs(root, stage)
    c = tracking.client(root)
    params = {**tracking.flatten(p.model_dump()), **tracking.flatten(p.eval.model_dump(), "eval."),
              **tracking.flatten(p.passkey.model_dump(), "passkey."), **tracking.flatten(exp.model_dump(), "exp."),
              "seed": str(seed), "eval_device": record["device"], "eval_precision": record["precision"]}
    tags = tracking.run_tags(root, stage, "evaluate", parent=train_run_id, experiment=exp.name, seed=seed,
                             ablations=tracking.ablations_of(study, exp.name), data_hash=record["data_hash"],
                             checkpoint_sha256=record["checkpoint_sha256"], checkpoint_of=exp.reuse or exp.name,
                             model_source=p.model.source_tag)
    out = layout.eval_path(root, exp.name, seed)  # PLAIN is named "base"
    with ExitStack() as runs:
        for protocol, entry in record["protocols"].items():
            primary = protocol == record["primary"]
            entry["run_id"] = runs.enter_context(tracking.open_run(root, stage, {
                **tags, "eval_protocol": protocol, "eval_primary": str(primary).lower()}, params))
            tracking.log_metrics(c, entry["run_id"], _metrics(entry, record["passkey"] if primary else None))
        record["run_id"] = record["protocols"][record["primary"]]["run_id"]
        with atomic_file(out) as tmp:  # the artifact keeps the output's name
            tmp.write_text(json.dumps(record, indent=2))
            for entry in record["protocols"].values():
                c.log_artifact(entry["run_id"], str(tmp), artifact_path="eval")
                if exp.reuse is None:  # a reused checkpoint's table is the other experiment's, logged by its own run
                    c.log_artifact(entry["run_id"], str(src / "frequencies.json"))
    return out
