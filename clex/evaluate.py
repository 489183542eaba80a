"""Perplexity by length under a named protocol, recorded as an MLflow run.

Every length is scored on the same test documents, each cut to the longest eval length, so a change
of PPL with length is a change of context, not of text. The model picks t from the window length
(t = ceil(n / L), capped at t_max: method.md §3.6). An experiment with `reuse:` (Dynamic NTK, the
StreamingLLM window) is evaluated on the reused experiment's checkpoint of the same seed.

Passkey retrieval (clex/passkey.py) runs at every eval length on the same examples for every model:
teacher-forced digit accuracy and exact-match share, overall and per needle depth.

Protocols (recorded as the `eval_protocol` tag and printed in every report):
- nonoverlapping: each document is cut into consecutive windows of n tokens; every prediction inside a
  window is scored (the first token of a window has no context and is not predicted).
- sliding: windows of n tokens advanced by `eval.stride`; the first window scores all its predictions,
  later ones only their last `stride` (each token scored once, with at least n - stride tokens of context).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from clex import tracking
from clex.config import EvalConfig, Study
from clex.data import data_hash, load_test_docs
from clex.passkey import eval_set, passkey_accuracy
from clex.train import PLAIN, base_dir, data_dir, finetune_dir, load_checkpoint, passkey_format


def windows(total: int, length: int, protocol: str, stride: int | None) -> list[tuple[int, int]]:
    """(start, first scored prediction index within the window) for one document of `total` tokens."""
    if protocol == "nonoverlapping":
        return [(s, 0) for s in range(0, total - length + 1, length)]
    starts = list(range(0, total - length + 1, stride))
    return [(s, 0 if i == 0 else length - 1 - stride) for i, s in enumerate(starts)]


@torch.inference_mode()
def perplexity(model, docs: torch.Tensor, length: int, cfg: EvalConfig) -> dict:
    """Summed NLL, scored-token count and PPL of `model` on (n_docs, max_len) tokens at window `length`."""
    model.eval()
    device = next(model.parameters()).device
    items = [(d, s, first) for d in range(docs.shape[0]) for s, first in windows(docs.shape[1], length, cfg.protocol, cfg.stride)]
    nll, count = 0.0, 0
    for i in range(0, len(items), cfg.batch_size):
        chunk = items[i:i + cfg.batch_size]
        batch = torch.stack([docs[d, s:s + length] for d, s, _ in chunk]).to(device).long()
        logits = model(batch)[:, :-1].float()  # the model sees all `length` tokens, as in the official eval
        losses = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # (B, length-1)
        for row, (_, _, first) in zip(losses, chunk):
            nll += row[first:].double().sum().item()
            count += row.shape[0] - first
    return {"nll": nll, "tokens": count, "ppl": math.exp(nll / count), "t": model.rope.inference_t(length)}


def eval_path(study: Study, experiment: str, seed: int | None) -> Path:
    root = study.root / "build" / "eval"
    return root / "base.json" if experiment == "base" else root / experiment / f"seed{seed}.json"


def evaluate(study: Study, experiment: str, seed: int | None = None) -> Path:
    """Evaluate the base model (experiment 'base') or one fine-tuned run; writes the eval JSON."""
    p = study.params
    if experiment == "base":
        exp, src, seed, stage = PLAIN, base_dir(study), p.pretrain.seed, "evaluate_base"
    else:
        exp, src, stage = study.experiment(experiment), finetune_dir(study, study.checkpoint_of(experiment), seed), \
            tracking.stage_name("evaluate", experiment, seed)
    fmt = passkey_format(study, min(p.eval.lengths), "the shortest of eval.lengths")
    trained = json.loads((src / "run.json").read_text())
    model = load_checkpoint(study, exp, src / "model.pt")
    test_docs, _ = load_test_docs(data_dir(study))
    docs = torch.from_numpy(test_docs[:, : p.max_eval_len].astype("int64"))
    results = {n: perplexity(model, docs, n, p.eval) for n in p.eval.lengths}
    passkey = {n: passkey_accuracy(model, *eval_set(fmt, test_docs, n, p.passkey.depths, p.passkey.samples,
                                                    p.passkey.seed), p.passkey.depths, p.eval.batch_size)
               for n in p.eval.lengths}

    root = study.root
    tracking.close_stale_runs(root, stage)
    out = eval_path(study, experiment, seed)
    record = {
        "experiment": exp.name, "seed": seed, "protocol": p.eval.protocol, "stride": p.eval.stride,
        "n_docs": int(docs.shape[0]), "train_run_id": trained["run_id"],
        "checkpoint_sha256": trained["checkpoint_sha256"], "data_hash": data_hash(data_dir(study)),
        "reused_checkpoint_of": exp.reuse,
        "ppl": {str(n): r["ppl"] for n, r in results.items()},
        "detail": {str(n): r for n, r in results.items()},
        "passkey": {str(n): r for n, r in passkey.items()},
    }
    import mlflow

    with mlflow.start_run(
        experiment_id=tracking.experiment_id(root), run_name=stage,
        tags={"role": "evaluate", "experiment": exp.name, "seed": str(seed), "dvc_stage": stage,
              "ablations": tracking.ablations_of(study, exp.name), "git_commit": tracking.git_commit(root),
              "data_hash": record["data_hash"], "checkpoint_sha256": record["checkpoint_sha256"],
              "eval_protocol": p.eval.protocol, "mlflow.parentRunId": trained["run_id"],
              "checkpoint_of": exp.reuse or exp.name},
    ) as run:
        mlflow.log_params({**tracking.flatten(p.model_dump()), **tracking.flatten(p.eval.model_dump(), "eval."),
                           **tracking.flatten(p.passkey.model_dump(), "passkey."),
                           **tracking.flatten(exp.model_dump(), "exp."), "seed": seed})
        for n, r in results.items():
            mlflow.log_metric("ppl", r["ppl"], step=n)  # step = length: the compare view draws PPL-vs-length
            mlflow.log_metric(f"ppl_{n}", r["ppl"])
        for n, r in passkey.items():  # passkey retrieval, logged like PPL (step = length)
            mlflow.log_metric("passkey_acc", r["digit_acc"], step=n)
            mlflow.log_metric("passkey_exact", r["exact"], step=n)
            for depth, d in r["by_depth"].items():
                mlflow.log_metric(f"passkey_acc_{n}_depth{depth}", d["digit_acc"])
        record["run_id"] = run.info.run_id
        tmp = out.parent / ".partial" / out.name  # the artifact keeps the output's name; moved into place last
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=2))
        mlflow.log_artifact(str(tmp), artifact_path="eval")
        if exp.reuse is None:  # a reused checkpoint's table is the other experiment's, logged by its own run
            mlflow.log_artifact(str(src / "frequencies.json"))
        tmp.rename(out)
        tmp.parent.rmdir()
    return out
