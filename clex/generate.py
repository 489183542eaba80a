"""`clex generate`: greedy or sampled continuation of a prompt, with the KV cache of the progressive protocol.

The prompt is prefilled in chunks of L tokens (as `progressive` feeds a window), then one token per step. The
context length n, and with it t (CLEX: ceil(n/L) capped at t_max; Dynamic NTK: n/L) and the attention log
scale, is recomputed at every step; the cached keys are re-rotated whenever θ(t) changes (`clex.model.KVCache`,
docs/method.md §3.6). Greedy by default; `temperature` > 0 samples from softmax(logits / temperature), restricted to
the `top_k` most likely tokens when given, from a generator seeded with `sample_seed`.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import torch

from clex import layout, tracking
from clex.checkpoint import checkpoint_path, checkpoint_source, load_checkpoint
from clex.config import ParamsError, Study
from clex.data import load_test_docs
from clex.evaluate import logit_chunks
from clex.io import atomic_write_text
from clex.model import Decoder, KVCache


def pick(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
         generator: torch.Generator | None = None) -> int:
    """The next token from (V,) logits: the argmax, or a draw at `temperature` among the `top_k` best."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.inference_mode()
def prefill(model: Decoder, prompt: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
    """A (P,) prompt, P >= 1, fed in chunks of L through a fresh cache: the cache and the last position's logits
    (only the last chunk's logits are kept)."""
    model.eval()
    cache = model.new_cache()
    device = next(model.parameters()).device
    for _, logits in logit_chunks(model, prompt.view(1, -1).to(device), cache=cache):
        last = logits[0, -1]
    return cache, last


@torch.inference_mode()
def decode_steps(model: Decoder, cache: KVCache, logits: torch.Tensor, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Iterator[tuple[int, float]]:
    """Continue from `prefill`, without end: yields (next id, t of the forward that predicted it), then feeds
    that id through the cache (one forward) for the next."""
    device = logits.device
    while True:
        t, token = model.context_t(cache.length), pick(logits, temperature, top_k, generator)
        yield token, t
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]


def generate(model: Decoder, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> tuple[list[int], list[float]]:
    """(generated ids, t of the forward that predicted each) for a (P,) prompt, P >= 1."""
    steps = islice(decode_steps(model, *prefill(model, prompt), temperature, top_k, generator), max_new_tokens)
    ids, ts = zip(*steps)
    return list(ids), list(ts)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, sample_seed: int | None) -> None:
    """ParamsError unless the decoding options make sense together."""
    if max_new_tokens < 1:
        raise ParamsError(f"--max-new-tokens: {max_new_tokens}; allowed: an integer >= 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ParamsError(f"--temperature: {temperature}; allowed: 0 (greedy, the default) or a finite number > 0")
    if top_k is not None and top_k < 1:
        raise ParamsError(f"--top-k: {top_k}; allowed: an integer >= 1")
    for flag, value in (("--top-k", top_k), ("--sample-seed", sample_seed)):
        if value is not None and temperature == 0:
            raise ParamsError(f"{flag}: {value} given for greedy decoding; allowed: only with --temperature > 0")


def prompt_ids(study: Study, prompt_file: Path | None, prompt_doc: int | None, prompt_tokens: int | None,
               tokenizer) -> list[int]:
    """The first `prompt_tokens` tokens (default L for a test document, all of a file) of `prompt_file` or of
    test document `prompt_doc` (default 0)."""
    if prompt_file is not None:
        if not Path(prompt_file).is_file():
            raise ParamsError(f"--prompt-file: {prompt_file} is not a file; allowed: a text file")
        ids = tokenizer.encode(Path(prompt_file).read_text(), add_special_tokens=False).ids  # as prepare encodes
        what = f"--prompt-file {prompt_file}"
    else:
        docs, _ = load_test_docs(layout.data_dir(study.root))
        doc = 0 if prompt_doc is None else prompt_doc
        if not 0 <= doc < len(docs):
            raise ParamsError(f"--prompt-doc: {doc}; allowed: a test document index in 0..{len(docs) - 1}")
        ids, what = docs[doc].astype(int).tolist(), f"test document {doc}"
        prompt_tokens = study.params.model.train_len if prompt_tokens is None else prompt_tokens
    n = len(ids) if prompt_tokens is None else prompt_tokens
    if not 1 <= n <= len(ids):
        raise ParamsError(f"--prompt-tokens: {n}; allowed: 1..{len(ids)}, the tokens of {what}")
    return ids[:n]


def run_generate(study: Study, experiment: str, seed: int | None, *, prompt_file: Path | None = None,
                 prompt_doc: int | None = None, prompt_tokens: int | None = None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int | None = None, sample_seed: int | None = None,
                 device: str = "auto", out: Path | None = None) -> dict:
    """Load `experiment`'s checkpoint of `seed` ('base': the pretrained model), continue the prompt and
    return (and with `out`, write as JSON) the prompt, the continuation and t per generated token."""
    from tokenizers import Tokenizer

    check_sampling(max_new_tokens, temperature, top_k, sample_seed)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"--device: {device}, but CUDA is not available; allowed: auto or cpu")
    exp, src, seed = checkpoint_source(study, experiment, seed)
    ckpt = checkpoint_path(study, src)  # model.pt, or a Hugging Face folder
    if not ckpt.exists():
        stage = "pretrain" if experiment == "base" else tracking.stage_name("finetune", study.checkpoint_of(experiment), seed)
        raise ParamsError(f"{experiment} (seed {seed}): no checkpoint at {ckpt}; "
                          f"allowed: a trained run (`dvc repro {stage}`)")
    tokenizer = Tokenizer.from_file(str(layout.data_dir(study.root) / "tokenizer.json"))
    prompt = prompt_ids(study, prompt_file, prompt_doc, prompt_tokens, tokenizer)
    model = load_checkpoint(study, exp, ckpt).to(device)
    generator = None if sample_seed is None else torch.Generator().manual_seed(sample_seed)
    start = time.perf_counter()
    ids, ts = generate(model, torch.tensor(prompt), max_new_tokens, temperature, top_k, generator)
    seconds = time.perf_counter() - start
    result = {"experiment": exp.name, "seed": seed, "checkpoint": str(ckpt), "device": device,
              "temperature": temperature, "top_k": top_k, "sample_seed": sample_seed,
              "prompt_ids": prompt, "generated_ids": ids, "prompt_text": tokenizer.decode(prompt),
              "text": tokenizer.decode(ids), "t": ts, "seconds": seconds}
    if out is not None:
        atomic_write_text(Path(out), json.dumps(result, indent=2))
    return result
