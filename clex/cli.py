"""`clex`: one subcommand per pipeline stage. Each validates the whole study before any compute.

Bad params print one message per problem (file, key, value, what is allowed) and exit with status 2
before anything is written; so does a non-finite result (`NonFiniteError`: which run, length, likely cause). Heavy imports (torch, lightning, mlflow) happen only inside the commands.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from clex import layout
from clex.config import ParamsError, Study, load_study, read_yaml_text
from clex.notebooks import NotebookError


def _validate(study: Study, args) -> None:
    from clex.pipeline import missing_params

    missing = missing_params(study, read_yaml_text(study.root / "params.yaml"))
    if missing:
        raise ParamsError(f"params.yaml: {', '.join(missing)}: missing; DVC tracks every one of these keys, "
                          "so params.yaml must list them all (copy the defaults from the repo's params.yaml)")
    from clex.pipeline import write

    if not write(study, check=True):
        raise ParamsError("dvc.yaml: out of date: its GENERATED part (reuse evaluations, sweep, ablation stages) "
                          "no longer matches params.yaml, experiments/ or ablations/; allowed: the part `clex pipeline` "
                          "writes, so run `clex pipeline` first")
    import json

    from clex.io import atomic_dir, atomic_write_text

    # constant: downstream caches stay valid
    atomic_write_text(layout.validated(study.root), "params, experiments and ablations are valid\n")
    with atomic_dir(layout.experiments_dir(study.root)) as resolved:  # what each fine-tune depends on, `extends` resolved
        for name, exp in study.experiments.items():
            (resolved / f"{name}.json").write_text(json.dumps(exp.model_dump(exclude={"description"}), indent=1,
                                                              sort_keys=True))
    print(f"valid: {len(study.experiments)} experiments, {len(study.ablations)} ablations")


def _prepare(study: Study, args) -> None:
    from clex.data import prepare

    manifest = prepare(study.params.data, layout.data_dir(study.root), test_len=study.params.max_eval_len,
                       root=study.root, model=study.params.model)
    print(f"prepared data {manifest['data_hash'][:12]}: {manifest['counts']}")


def _seed(study: Study, seed: int) -> int:
    if seed not in study.params.finetune.seeds:
        raise ParamsError(f"--seed: {seed} is not in finetune.seeds; allowed: {study.params.finetune.seeds}")
    return seed


def _pretrain(study: Study, args) -> None:
    from clex.train import train

    print(f"base model written to {train(study)}")


def _finetune(study: Study, args) -> None:
    from clex.train import train

    exp, seed = study.experiment(args.experiment), _seed(study, args.seed)
    if exp.reuse is not None:
        raise ParamsError(f"experiment: {exp.name!r} reuses {exp.reuse!r}'s checkpoints and is never fine-tuned; "
                          f"allowed: {study.trained()}")
    print(f"fine-tuned model written to {train(study, exp, seed)}")


def _evaluate(study: Study, args) -> None:
    from clex.evaluate import evaluate

    if args.experiment != "base":
        study.experiment(args.experiment)
        _seed(study, args.seed)
    print(f"evaluation written to {evaluate(study, args.experiment, args.seed)}")


def _generate(study: Study, args) -> None:
    from clex.generate import run_generate

    if args.experiment != "base":
        study.experiment(args.experiment)
        if args.seed is None:
            raise ParamsError("--seed: required when generating with a fine-tuned experiment")
        _seed(study, args.seed)
    result = run_generate(study, args.experiment, args.seed, prompt_file=args.prompt_file, prompt_doc=args.prompt_doc,
                          prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, sample_seed=args.sample_seed,
                          device=args.device, out=args.out)
    print(f"{result['experiment']} seed {result['seed']}: {len(result['prompt_ids'])} prompt tokens, "
          f"{len(result['generated_ids'])} generated at t {result['t'][0]}..{result['t'][-1]} "
          f"({len(result['generated_ids']) / result['seconds']:.1f} tokens/s)", file=sys.stderr)
    print(result["text"])
    if args.out:
        print(f"written {args.out}", file=sys.stderr)


def _report(study: Study, args) -> None:
    from clex import tracking
    from clex.report import build_report, comparison_experiment

    study.ablation(args.ablation)
    out = build_report(study, args.ablation)
    print((out / "table.md").read_text())
    print(f"report: {out}/table.md, plot: {out}/ppl_vs_length.png")
    compare = comparison_experiment(args.ablation)
    print(f"MLflow: experiment {compare}, in the UI (README, MLflow): http://127.0.0.1:5000/#/experiments/"
          f"{tracking.experiment_id(study.root, compare)}/runs?workflowType=machine_learning&compareRunsMode=CHART")


def _sweep(study: Study, args) -> None:
    from clex.sweep import run_sweep

    out = run_sweep(study, workers=args.workers)
    print(f"sweep written to {out}")


def _notebooks(study: Study, args) -> None:
    from clex.notebooks import run_notebooks

    out = run_notebooks(study, names=args.names)
    print(f"executed notebooks and figures written to {out}")


def _pipeline(study: Study, args) -> int:
    from clex.pipeline import write

    current = write(study, check=args.check)
    if args.check and not current:
        print("dvc.yaml is out of date: run `clex pipeline`", file=sys.stderr)
        return 1
    print("dvc.yaml is up to date" if current else "dvc.yaml written")
    return 0


def _profile(study: Study, args) -> None:
    from clex.profile import BACK, apply, describe, plan

    new, changed = apply(study.root, args.overlay, dry_run=args.dry_run)
    width = max((len(k) for k in changed), default=0)
    print("\n".join(f"  {k:<{width}}  {old!r} -> {value!r}" for k, (old, value) in changed.items()) or "  (no change)")
    if "discrete_vs_continuous" in new.ablations:
        print(describe(plan(new, "discrete_vs_continuous")))
    if args.dry_run:
        print(f"valid; nothing written (--dry-run): {len(changed)} keys would change")
        return
    print(f"params.yaml and dvc.yaml now hold {args.overlay} ({len(changed)} keys changed); back to the default: "
          f"`{BACK}`\nrun: dvc repro ablations/discrete_vs_continuous")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clex", description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.environ.get("CLEX_ROOT", "."), help="study root (holds params.yaml)")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("validate", help="check params, experiments and ablations").set_defaults(func=_validate)
    sub.add_parser("prepare", help="corpus -> split -> tokenizer -> token arrays").set_defaults(func=_prepare)
    sub.add_parser("pretrain", help="train the plain-RoPE base model at length L").set_defaults(func=_pretrain)
    ft = sub.add_parser("finetune", help="fine-tune one experiment from the base model")
    ft.add_argument("experiment")
    ft.add_argument("--seed", type=int, required=True)
    ft.set_defaults(func=_finetune)
    ev = sub.add_parser("evaluate", help="PPL by length of 'base' or of one fine-tuned run")
    ev.add_argument("experiment")
    ev.add_argument("--seed", type=int)
    ev.set_defaults(func=_evaluate)
    gen = sub.add_parser("generate", help="continue a prompt with 'base' or a fine-tuned run (KV cache, t per step)")
    gen.add_argument("experiment")
    gen.add_argument("--seed", type=int, help="fine-tune seed (required unless 'base')")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-file", type=Path, help="prompt text (default: test document --prompt-doc)")
    prompt.add_argument("--prompt-doc", type=int, help="test document whose prefix is the prompt (default 0)")
    gen.add_argument("--prompt-tokens", type=int, help="the prompt's first N tokens (default: L of a document, a whole file)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    gen.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    gen.add_argument("--sample-seed", type=int, help="seed of the sampling generator")
    gen.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    gen.add_argument("--out", type=Path, help="write prompt, generated ids, text and t per step as JSON")
    gen.set_defaults(func=_generate)
    rp = sub.add_parser("report", help="an ablation's table, plot and metrics")
    rp.add_argument("ablation")
    rp.set_defaults(func=_report)
    sw = sub.add_parser("sweep", help="Optuna sweep over CLEX's ODE width and t_max (params `sweep`); resumable")
    sw.add_argument("--workers", type=int, help="worker processes sharing the study's storage (default: sweep.workers)")
    sw.set_defaults(func=_sweep)
    nb = sub.add_parser("notebooks", help="execute analysis/*.ipynb headless (papermill) against the MLflow store")
    nb.add_argument("names", nargs="*", help="notebook names without .ipynb (default: all)")
    nb.set_defaults(func=_notebooks)
    pl = sub.add_parser("pipeline", help="write dvc.yaml's generated part (what DVC's templating cannot express)")
    pl.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml's generated part is out of date")
    pl.set_defaults(func=_pipeline)
    pr = sub.add_parser("profile", help="apply a params overlay (e.g. profiles/gpu.yaml) to params.yaml and dvc.yaml")
    pr.add_argument("overlay", type=Path, help="YAML with params.yaml keys to change (only those)")
    pr.add_argument("--dry-run", action="store_true", help="validate and print the changes; write nothing")
    pr.set_defaults(func=_profile)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "evaluate" and args.experiment != "base" and args.seed is None:
            raise ParamsError("--seed: required when evaluating a fine-tuned experiment")
        study = load_study(Path(args.root))
        return args.func(study, args) or 0
    except ParamsError as e:
        print(f"clex {args.command}: {e.kind}\n{e}", file=sys.stderr)
        return 2
    except NotebookError as e:  # a notebook raised: its name, cell and error, and where the executed copy is
        print(f"clex {args.command}: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk (or quota, or file-size limit): one line, not a traceback
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        print(f"clex {args.command}: no space to write\n{e}. Outputs are written to a temporary file and renamed into "
              "place, so none was left half-written; free space and rerun the stage.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
