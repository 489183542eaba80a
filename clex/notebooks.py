"""`clex notebooks`: execute analysis/*.ipynb headless (papermill) against the study's MLflow store.

Each notebook runs in a kernel of this interpreter (`check_kernel`), with cwd = the study root and the
parameters `root`, `tracking_uri` (the store this command reads, resolved) and `figures`. The kernel imports
`clex` from this environment, never from the cwd, so the notebooks read any study folder (an older checkout
too) with the code of the command that runs them.

All or nothing: notebooks execute into build/analysis/staging/, and the executed notebooks, their PNGs and
timings.json move into reports/analysis/ only once every one succeeded. A notebook that raises stops the
command with `NotebookError` naming the notebook and its failing cell; its executed copy, error included,
stays at build/analysis/failed/<name>.ipynb. Running some notebooks replaces only theirs: the executed
notebook, the figures whose names start with its number ('03_'), its timing.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from clex import layout, tracking
from clex.config import ParamsError, Study
from clex.io import move_files

NOTEBOOKS = "analysis"
KERNEL = "python3"


class NotebookError(RuntimeError):
    """A notebook raised, or cannot run in this environment; the message says which, where and what to do."""


def available(root: Path) -> list[str]:
    """The notebooks `clex notebooks` knows: analysis/*.ipynb without the suffix, sorted."""
    return sorted(p.stem for p in (Path(root) / NOTEBOOKS).glob("*.ipynb"))


def figure_prefix(name: str) -> str:
    """The start every figure of notebook `name` has: its number and an underscore ('03_frequency_basis' -> '03_')."""
    return name.split("_", 1)[0] + "_"


def check_kernel(name: str = KERNEL) -> None:
    """Fail unless the `name` kernelspec launches this interpreter's environment (papermill would otherwise run
    the notebooks with whatever Python the spec names, without this environment's packages)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    fix = f"install this environment's: {sys.executable} -m ipykernel install --sys-prefix"
    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise NotebookError(f"no {name!r} Jupyter kernelspec; {fix}") from None
    exe = spec.argv[0]
    if exe in {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}:
        return  # jupyter_client launches a bare `python` as sys.executable
    try:
        prefix = subprocess.run([exe, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                                timeout=60).stdout.strip()
    except OSError:
        prefix = "(not runnable)"
    if not prefix or Path(prefix).resolve() != Path(sys.prefix).resolve():
        raise NotebookError(f"the {name!r} kernelspec in {spec.resource_dir} runs {exe} (environment {prefix}), "
                            f"not this environment ({sys.prefix}); remove that kernelspec or {fix}")


def run_notebooks(study: Study, names: list[str] | None = None) -> Path:
    """Execute the named notebooks (default: all, sorted) and publish them to reports/analysis/; returns that folder."""
    import papermill as pm

    root = study.root
    allowed = available(root)
    unknown = [n for n in names or [] if n not in allowed]
    if unknown:
        raise ParamsError(f"notebooks: {unknown} unknown; allowed: {allowed} (analysis/*.ipynb without .ipynb)")
    chosen = sorted(set(names or allowed))
    check_kernel()
    staging = layout.analysis_build(root) / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "figures").mkdir(parents=True)
    params = {"root": str(root), "tracking_uri": tracking.tracking_uri(root), "figures": str(staging / "figures")}
    timings = {}
    try:
        for name in chosen:
            before = set((staging / "figures").iterdir())
            start = time.perf_counter()
            print(f"running {NOTEBOOKS}/{name}.ipynb", file=sys.stderr, flush=True)
            try:
                pm.execute_notebook(root / NOTEBOOKS / f"{name}.ipynb", staging / f"{name}.ipynb", parameters=params,
                                    kernel_name=KERNEL, cwd=str(root), progress_bar=False,
                                    extra_arguments=["--InteractiveShellApp.ignore_cwd=True"])
            except pm.PapermillExecutionError as e:
                raise _failure(root, staging, name, e) from None
            timings[name] = round(time.perf_counter() - start, 2)
            stray = [p.name for p in set((staging / "figures").iterdir()) - before
                     if not p.name.startswith(figure_prefix(name))]
            if stray:
                raise NotebookError(f"{NOTEBOOKS}/{name}.ipynb wrote figures {stray}; their names must start with "
                                    f"{figure_prefix(name)!r} (how a rerun of one notebook finds its figures)")
        _publish(layout.analysis_reports(root), staging, chosen, timings, everything=chosen == allowed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return layout.analysis_reports(root)


def _failure(root: Path, staging: Path, name: str, e) -> NotebookError:
    """Keep the failed executed notebook under build/analysis/failed/ and say where and why it failed."""
    failed = layout.analysis_build(root) / "failed" / f"{name}.ipynb"
    failed.parent.mkdir(parents=True, exist_ok=True)
    if (staging / f"{name}.ipynb").exists():
        shutil.move(staging / f"{name}.ipynb", failed)
    first = next((line for line in e.source.splitlines() if line.strip()), "")
    msg = (f"{NOTEBOOKS}/{name}.ipynb failed in cell [{e.exec_count}] (starting `{first}`): {e.ename}: {e.evalue}\n"
           f"executed notebook with the traceback: {failed}\nnothing was written to {layout.analysis_reports(root)}")
    return NotebookError(msg)


def _publish(out: Path, staging: Path, names: list[str], timings: dict, everything: bool) -> None:
    """Move the staged notebooks and figures into `out`, replacing those of the notebooks that ran (all of
    `out` when every notebook ran), and merge timings.json ({notebook: seconds})."""
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    stale = [p for p in out.glob("*.ipynb") if everything or p.stem in names]
    stale += [p for p in figures.glob("*.png") if everything or any(p.name.startswith(figure_prefix(n)) for n in names)]
    old = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() and not everything else {}
    (staging / "timings.json").write_text(json.dumps({**old, **timings}, indent=2, sort_keys=True) + "\n")
    for p in stale:
        p.unlink()
    move_files(staging, out)
