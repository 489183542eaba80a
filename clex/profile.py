"""`clex profile <overlay.yaml>`: switch the study to another scale (e.g. profiles/gpu.yaml) in one command.

A profile is an overlay over params.yaml: the same keys, only those that change. Applying it validates the
merged study first (`load_study` on the merged params, read from a temporary file, against this study's
experiments/ and ablations/), so a bad overlay key or value raises ParamsError naming the overlay file, the key,
the value and what is allowed, and nothing is written. A key that params.yaml does not spell out is refused too
(a typo must not pass silently, and DVC tracks only keys params.yaml lists). Then params.yaml is rewritten as
merged(params.yaml, overlay) and dvc.yaml's generated part is regenerated (clex.pipeline), each atomically
(clex.io). params.yaml's comments are dropped in the rewrite (the values are YAML-dumped); a header names the
profiles applied and how to go back: `git checkout params.yaml dvc.yaml`.

`plan()` counts what one ablation's `dvc repro` trains and evaluates and the training FLOPs, the one estimate
behind profiles/gpu.yaml's sizing, `clex profile`'s summary and benchmarks/gpu_profile.py's projection.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from clex.config import ModelConfig, ParamsError, Study, load_study, merged, read_yaml_text
from clex.io import atomic_write_text
from clex.pipeline import missing_params, render

HEADER = "# clex profile: "  # one header line per profile applied, oldest first
BACK = "git checkout params.yaml dvc.yaml"


def unknown_keys(base: dict, overlay: dict, prefix: str = "") -> list[str]:
    """Messages for every overlay key that `base` (params.yaml) does not hold, recursively into mappings that
    both hold: 'key: value: not in params.yaml; allowed: ...'."""
    out = []
    for k, v in overlay.items():
        key = f"{prefix}{k}"
        if k not in base:
            out.append(f"{key}: {v!r}: not in params.yaml; allowed: {sorted(map(str, base))} (a key params.yaml "
                       "leaves out must be added there first: DVC tracks only the keys it spells out)")
        elif isinstance(v, dict) and isinstance(base[k], dict):
            out += unknown_keys(base[k], v, f"{key}.")
    return out


def changes(base: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (old, new)} of every leaf whose value differs between two params mappings."""
    out = {}
    for k in new:
        if isinstance(new[k], dict) and isinstance(base.get(k), dict):
            out.update(changes(base[k], new[k], f"{prefix}{k}."))
        elif base.get(k) != new[k]:
            out[f"{prefix}{k}"] = (base.get(k), new[k])
    return out


class _Dumper(yaml.SafeDumper):
    """Block mappings, lists of scalars in flow style ([0.9, 0.95]), as params.yaml is written by hand."""


_Dumper.add_representer(list, lambda d, data: d.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=all(not isinstance(v, (dict, list)) for v in data)))


def _headers(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(HEADER)]


def resolve(root: Path, overlay_path: Path) -> tuple[Study, dict, str, str]:
    """(the merged study, its changes, params.yaml's new text, dvc.yaml's new text), validated; writes nothing."""
    root = Path(root).resolve()
    source = str(overlay_path)
    overlay = read_yaml_text(Path(overlay_path))
    if not isinstance(overlay, dict):
        raise ParamsError(f"{source}: expected a mapping of params.yaml keys to values, got {type(overlay).__name__}")
    current = (root / "params.yaml").read_text(encoding="utf-8")
    base = read_yaml_text(root / "params.yaml")
    bad = unknown_keys(base, overlay)
    if bad:
        raise ParamsError("\n".join(f"{source}: {b}" for b in bad))
    new = merged(base, overlay)
    names = [h.removeprefix(HEADER).split(" ")[0] for h in _headers(current)] + [Path(overlay_path).as_posix()]
    text = "".join(f"{HEADER}{n} (over the params.yaml before it)\n" for n in dict.fromkeys(names))
    text += (f"# Written by `clex profile`: values of the repo's params.yaml with those profiles' keys; comments are "
             f"in those files.\n# Back to the default: {BACK}\n")
    text += yaml.dump(new, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=118)
    if yaml.safe_load(text) != new:  # the dump must read back as the merged values
        raise AssertionError("clex profile: the rewritten params.yaml does not read back as the merged values")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            study = load_study(root, params_file=str(path))
            missing = missing_params(study, new)
        except ParamsError as e:
            raise type(e)(str(e).replace(str(path), f"{source} (over params.yaml)")) from None
    if missing:
        raise ParamsError(f"{source} (over params.yaml): {', '.join(missing)}: missing; DVC tracks these keys")
    return study, changes(base, new), text, render(study)


def apply(root: Path, overlay_path: Path, dry_run: bool = False) -> tuple[Study, dict]:
    """Validate, then (unless dry_run) write params.yaml and dvc.yaml; returns the new study and its changes."""
    study, changed, text, dvc_text = resolve(root, overlay_path)
    if not dry_run:
        atomic_write_text(study.root / "params.yaml", text)
        if (study.root / "dvc.yaml").read_text() != dvc_text:
            atomic_write_text(study.root / "dvc.yaml", dvc_text)
    return study, changed


# ------------------------------------------------------------------------------------ what an ablation costs
def n_params(model: ModelConfig, vocab: int) -> int:
    """The decoder's parameters (clex/model.py: bias-free linears, RMSNorm, embedding tied to the head), without
    the position encoding's few."""
    d = model.d_model
    return model.n_layers * (4 * d * d + 3 * d * model.d_ff + 2 * d) + vocab * d + d


def train_flops_per_token(model: ModelConfig, vocab: int, seq_len: int) -> int:
    """6·N (forward and backward of every weight) + 12·layers·d·T (attention scores and values, PaLM's count)."""
    return 6 * n_params(model, vocab) + 12 * model.n_layers * model.d_model * seq_len


def plan(study: Study, ablation: str) -> dict:
    """What `dvc repro ablations/<ablation>` runs from a clean clone: training tokens and FLOPs of the
    pretraining and of each fine-tune, and how many fine-tunes and evaluations (the base model's included)."""
    p = study.params
    ab = study.ablation(ablation)
    trained = sorted({study.checkpoint_of(e) for e in ab.experiments})
    vocab, L = p.data.vocab_size, p.model.train_len
    pre_tokens = p.pretrain.steps * p.pretrain.batch_size * L
    fine = {e: study.finetune_config(e) for e in trained}
    fine_tokens = {e: f.steps * f.batch_size * f.seq_len_factor * L for e, f in fine.items()}
    seeds = len(p.finetune.seeds)
    flops = pre_tokens * train_flops_per_token(p.model, vocab, L) + seeds * sum(
        t * train_flops_per_token(p.model, vocab, fine[e].seq_len_factor * L) for e, t in fine_tokens.items())
    return {"ablation": ablation, "n_params": n_params(p.model, vocab), "pretrain_tokens": pre_tokens,
            "finetunes": seeds * len(trained), "finetune_tokens": seeds * sum(fine_tokens.values()),
            "evaluations": 1 + seeds * len(ab.experiments), "max_eval_len": p.max_eval_len, "train_flops": flops}


def describe(plan_: dict) -> str:
    """One line: what the ablation trains and evaluates."""
    return (f"{plan_['ablation']}: {plan_['n_params'] / 1e6:.1f}M parameters, pretraining {plan_['pretrain_tokens'] / 1e6:.1f}M "
            f"tokens, {plan_['finetunes']} fine-tunes ({plan_['finetune_tokens'] / 1e6:.1f}M tokens), "
            f"{plan_['evaluations']} evaluations to {plan_['max_eval_len']} tokens; {plan_['train_flops'] / 1e15:.0f} PFLOP "
            "of training")

