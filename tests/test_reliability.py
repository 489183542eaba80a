"""Faults and hostile inputs (issue 11; the table is docs/reliability.md): each gets one clear message and exit 2
with nothing written, or is handled so that nothing is lost or silently wrong."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml

from clex.cli import main
from tokenizers import Tokenizer

from clex.config import DataConfig, NonFiniteError, ParamsError
from clex.data import load_documents, prepare
from clex.report import rows
from conftest import make_study, run, tiny_params

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = ["textwrap.py", "bisect.py", "shlex.py", "fnmatch.py", "glob.py", "copy.py", "heapq.py", "keyword.py",
           "colorsys.py", "opcode.py", "numbers.py", "struct.py"]


def _set(d: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for k in path:
        d = d.setdefault(k, {})
    d[last] = value


def _clex(study: Path, capsys, *args: str) -> tuple[int, str]:
    """`clex --root study ...` in this process: (exit status, stderr)."""
    rc = main(["--root", str(study), *args])
    return rc, capsys.readouterr().err


def _nothing_written(study: Path) -> None:
    assert not (study / "build").exists() or not any((study / "build").rglob("*")), "outputs were written"
    assert not (study / "mlflow.db").exists() and not (study / "mlruns").exists()


def _corpus(folder: Path, texts: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, data in texts.items():
        (folder / name).write_bytes(data)
    return folder


BAD_PARAMS = [
    # (dotted key in params.yaml, bad value, words the message must contain)
    ("eval.lengths", [0, 32, 64], ["eval.lengths.0", "got 0", "greater than or equal to 1"]),
    ("eval.lengths", [-32, 32], ["eval.lengths.0", "got -32", "greater than or equal to 1"]),
    ("model.init_std", math.inf, ["model.init_std", "got inf", "finite number"]),
    ("pretrain.weight_decay", math.inf, ["pretrain.weight_decay", "got inf", "finite number"]),
    ("finetune.weight_decay", math.inf, ["finetune.weight_decay", "got inf", "finite number"]),
    ("trainer.gradient_clip_val", math.inf, ["trainer.gradient_clip_val", "got inf", "finite number"]),
    ("finetune.lr", math.nan, ["finetune.lr", "got nan", "finite number"]),
    ("trainer.devices", 0, ["trainer.devices", "got 0", "a number of devices >= 1, or 'auto'"]),
    ("finetune.steps", True, ["finetune.steps", "got True", "valid integer"]),
    ("model.init_std", True, ["model.init_std", "got True", "valid number"]),
]


@pytest.mark.parametrize("key,value,words", BAD_PARAMS, ids=[f"{b[0]}={b[1]}" for b in BAD_PARAMS])
def test_bad_param_values_exit_2_naming_key_value_and_allowed(tmp_path, capsys, key, value, words):
    params = tiny_params()
    _set(params, key, value)
    study = make_study(tmp_path / "study", params)
    rc, err = _clex(study, capsys, "validate")
    assert rc == 2 and "clex validate: invalid parameters" in err
    for w in words:
        assert w in err, f"{w!r} missing from:\n{err}"
    _nothing_written(study)


def test_non_finite_experiment_override_is_refused(tmp_path, capsys):
    study = make_study(tmp_path / "study")
    path = study / "experiments/naive_ft.yaml"  # (an experiment without a finetune: block of its own)
    path.write_text(path.read_text() + "finetune: {weight_decay: .inf}\n")
    rc, err = _clex(study, capsys, "validate")
    assert rc == 2 and "experiments/naive_ft.yaml: finetune.weight_decay: got inf; Input should be a finite number" in err
    _nothing_written(study)


def test_duplicate_yaml_key_is_refused_with_its_line(tmp_path, capsys):
    study = make_study(tmp_path / "study")
    text = (study / "params.yaml").read_text()
    lines = text.splitlines()
    at = lines.index("finetune:") + 1
    lines.insert(at, "  lr: 0.5")  # finetune.lr twice: PyYAML alone would keep the last one silently
    (study / "params.yaml").write_text("\n".join(lines) + "\n")
    again = next(i for i, line in enumerate(lines) if line.strip().startswith("lr:") and i > at) + 1  # the original
    rc, err = _clex(study, capsys, "validate")
    assert rc == 2
    assert f"params.yaml: line {again}: duplicate key 'lr' (first at line {at + 1}); allowed: each key once" in err
    _nothing_written(study)


def test_non_utf8_params_is_refused(tmp_path, capsys):
    study = make_study(tmp_path / "study")
    (study / "params.yaml").write_bytes((study / "params.yaml").read_bytes() + "# café\n".encode("latin-1"))
    rc, err = _clex(study, capsys, "validate")
    assert rc == 2 and "params.yaml: byte b'\\xe9' at offset" in err and "allowed: a UTF-8 encoded YAML file" in err
    _nothing_written(study)


@pytest.mark.parametrize("files,words", [
    ({"bad.yaml": "extends: ../params\n"}, ["experiments/bad.yaml: extends: got '../params'; allowed: one of [",
                                            "'clex'"]),
    ({"bad.yaml": "extends: bad2\n", "bad2.yaml": "extends: bad\n"},
     ["experiments/bad2.yaml: extends: 'bad' makes a cycle (bad -> bad2 -> bad)"]),
    ({"bad.yaml": "extends: bad\n"}, ["experiments/bad.yaml: extends: 'bad' makes a cycle (bad -> bad)"]),
], ids=["path", "cycle", "self"])
def test_bad_extends_is_refused(tmp_path, capsys, files, words):
    study = make_study(tmp_path / "study")
    for name, text in files.items():
        (study / "experiments" / name).write_text(text)
    rc, err = _clex(study, capsys, "validate")
    assert rc == 2
    for w in words:
        assert w in err, f"{w!r} missing from:\n{err}"
    _nothing_written(study)


def test_corpus_glob_rooted_at_the_study_is_refused(tmp_path, capsys):
    """DVC tracks the folder a data.files glob is rooted at: the study folder itself (which holds build/) cannot be."""
    params = tiny_params()
    study = tmp_path / "study"
    params["data"] = {**params["data"], "source": "files", "files": str(study / "*.txt")}
    study = make_study(study, params)
    (study / "notes.txt").write_text("some text\n")
    rc, err = _clex(study, capsys, "validate")
    assert rc == 2 and f"data.files: '{study}/*.txt' is rooted at '{study}'" in err and "e.g. 'corpus/**/*.txt'" in err
    _nothing_written(study)


def _files_study(tmp_path: Path, texts: dict[str, bytes]) -> Path:
    params = tiny_params()
    corpus = _corpus(tmp_path / "corpus", texts)
    params["data"] = {**params["data"], "source": "files", "files": str(corpus / "*")}
    return make_study(tmp_path / "study", params)


@pytest.mark.parametrize("texts,words", [
    ({f"{i}.txt": b"" for i in range(4)} | {"blank.txt": b"  \n"},
     ["data.files:", "the corpus has 0 non-empty documents", "allowed: a corpus of at least 3"]),
    ({f"{i}.txt": b"a few words\n" for i in range(3)},
     ["data.files:", "no test document has 128 tokens (the longest eval length)", "Allowed: a corpus with longer"]),
], ids=["empty", "too_small"])
def test_empty_or_too_small_corpus_exits_2(tmp_path, capsys, texts, words):
    study = _files_study(tmp_path, texts)
    rc, err = _clex(study, capsys, "prepare")
    assert rc == 2 and "clex prepare: invalid parameters" in err
    for w in words:
        assert w in err, f"{w!r} missing from:\n{err}"
    _nothing_written(study)


def test_a_split_too_small_for_one_eval_window_is_refused(tmp_path):
    """Ten identical documents of k tokens, test_len = k: the test document fits, the one-document validation
    split (k + 1 tokens with its separator) holds no window of k + 1 tokens to predict from."""
    text = (STDLIB / "textwrap.py").read_bytes()
    corpus = _corpus(tmp_path / "corpus", {f"{i}.txt": text for i in range(10)})
    cfg = DataConfig(source="files", files=str(corpus / "*.txt"), vocab_size=300, val_fraction=0.05, test_fraction=0.1)
    prepare(cfg, tmp_path / "probe", test_len=8)
    k = len(Tokenizer.from_file(str(tmp_path / "probe/tokenizer.json")).encode(text.decode()).ids)
    with pytest.raises(ParamsError, match=fr"the val split has {k + 1} tokens; a window of the longest eval length "
                                          fr"needs more than {k + 1}; allowed: a larger corpus, a larger data.val_fraction"):
        prepare(cfg, tmp_path / "data", test_len=k)
    assert not (tmp_path / "data").exists() and not (tmp_path / "data.partial").exists()


def test_binary_files_in_a_corpus_are_skipped_with_a_warning(tmp_path):
    texts = {f"{Path(n).stem}.txt": (STDLIB / n).read_bytes() for n in SOURCES}
    corpus = _corpus(tmp_path / "corpus", texts | {"blob.bin": bytes(range(256)) * 4, "latin1.txt": "café\n".encode("latin-1")})
    cfg = DataConfig(source="files", files=str(corpus / "*"), vocab_size=400, val_fraction=0.2, test_fraction=0.25)
    with pytest.warns(UserWarning, match=r"skipped 2 of 14 files that are not UTF-8 text .*blob.bin, .*latin1.txt"):
        ids, docs, where = load_documents(cfg)
    assert ids == sorted(str(corpus / n) for n in texts) and docs == [Path(i).read_text() for i in ids]
    assert where["skipped_files"] == [str(corpus / "blob.bin"), str(corpus / "latin1.txt")]


def test_dvc_reruns_prepare_when_a_local_corpus_file_changes(tmp_path):
    """data.source files: the folder the glob is rooted at is a dependency of prepare (dvc.yaml), so an edited,
    added or removed corpus file makes `dvc status` report prepare and `dvc repro` rerun it."""
    study = tmp_path / "study"
    params = tiny_params()
    params["data"] = {**params["data"], "source": "files", "files": "corpus/**/*.txt"}
    _corpus(study / "corpus" / "sub", {f"{Path(n).stem}.txt": (STDLIB / n).read_bytes() for n in SOURCES})
    make_study(study, params)
    run(study, "clex", "pipeline")
    assert "corpus/sub" not in (study / "dvc.yaml").read_text()
    assert yaml.safe_load((study / "dvc.yaml").read_text())["stages"]["prepare"]["deps"][-1] == "corpus"
    run(study, "dvc", "repro", "prepare")
    before = json.loads((study / "build/data/manifest.json").read_text())["corpus_sha256"]
    assert "changed" not in run(study, "dvc", "status", "prepare").stdout
    with open(study / "corpus/sub/heapq.txt", "a") as f:
        f.write("\n# an edit to one corpus file\n")
    status = run(study, "dvc", "status", "prepare").stdout
    assert "prepare:" in status and "modified:" in status and "corpus" in status, status
    out = run(study, "dvc", "repro", "prepare").stdout
    assert "Running stage 'prepare'" in out
    assert json.loads((study / "build/data/manifest.json").read_text())["corpus_sha256"] != before


def _evaluation_code() -> list[str]:
    """The clex files `clex evaluate` imports that compute (not config, paths, MLflow tags or file writes: those do
    not change an eval JSON's numbers), as dvc.yaml names them; and no Lightning among its imports."""
    code = ("import sys, clex.cli, clex.evaluate; print('lightning' in sys.modules); "
            "print(*sorted(m for m in sys.modules if m.startswith('clex.')))")
    lightning, modules = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                        check=True).stdout.splitlines()
    assert lightning == "False"  # an evaluation does not pay for importing the trainer
    files = {"clex/rope" if m.startswith("clex.rope") else m.replace(".", "/") + ".py" for m in modules.split()}
    return sorted(files - {"clex/cli.py", "clex/config.py", "clex/spec.py", "clex/layout.py", "clex/io.py",
                           "clex/tracking.py", "clex/notebooks.py"})


def test_stages_declare_the_code_and_params_they_read(tmp_path):
    """An evaluation runs the decoder, the encodings, the data readers and the checkpoint loader: a change there
    that leaves the fine-tuned weights bit-identical must rerun it; a report prints L, the base seed and the
    passkey settings; validate checks dvc.yaml with clex/pipeline.py."""
    from clex.config import load_study
    from clex.pipeline import hand_written, stages

    study = load_study(make_study(tmp_path / "study"))
    s = {**hand_written(study), **{name: stanza for name, (_, stanza) in stages(study).items()}}
    for name in ("evaluate_base", "evaluate", "evaluate_on_naive_ft", "evaluate_on_clex"):
        deps = s[name]["deps"]
        assert {"clex/evaluate.py", "clex/passkey.py", "clex/streaming.py", "clex/attention.py", "clex/model.py", "clex/rope", "clex/data.py",
                "clex/checkpoint.py"} <= set(deps), name
        assert set(_evaluation_code()) <= set(deps), name
    assert {"model.train_len", "pretrain.seed", "passkey.samples", "passkey.digits", "passkey.train_fraction",
            "passkey.depths"} <= set(s["ablations/discrete_vs_continuous"]["params"])
    assert "clex/pipeline.py" in s["validate"]["deps"]
    assert s["prepare"]["deps"] == ["build/validated", "clex/data.py"]  # the stdlib corpus: nothing local to track


def test_nan_weight_stops_evaluate_before_anything_is_logged_or_written(trained_study, tmp_path):
    """A NaN in a fine-tuned checkpoint: `clex evaluate` exits 2 naming the run, length and tensor; no eval JSON,
    no evaluation run in MLflow (the fine-tune's own run is untouched)."""
    study = tmp_path / "study"
    shutil.copytree(trained_study, study)  # a shared fixture: other tests may have evaluated naive_ft there already
    shutil.rmtree(study / "build/eval", ignore_errors=True)
    run(study, "clex", "finetune", "naive_ft", "--seed", "0")
    import mlflow

    c = mlflow.MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    exp = c.get_experiment_by_name("clex-study")
    before = {r.info.run_id for r in c.search_runs([exp.experiment_id], "tags.dvc_stage = 'evaluate@naive_ft-0'")}
    ckpt = study / "build/finetune/naive_ft/seed0/model.pt"
    state = torch.load(ckpt, weights_only=True)
    name = next(k for k in state if k.endswith("attn.qkv.weight"))  # used by every forward
    state[name].view(-1)[0] = float("nan")
    torch.save(state, ckpt)
    proc = run(study, "clex", "evaluate", "naive_ft", "--seed", "0", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr
    assert "clex evaluate: non-finite result" in err
    for w in ["evaluate@naive_ft-0 (experiment naive_ft, seed 0, protocol progressive): test nll at length 32 is nan",
              f"likely cause: the checkpoint {ckpt} holds non-finite weights: {name} (1 NaN/inf values)",
              "Nothing was logged or written. Fix: if the file was damaged, `dvc repro --force finetune@naive_ft-0`"]:
        assert w in err, f"{w!r} missing from:\n{err}"
    assert not (study / "build/eval/naive_ft").exists() or not any((study / "build/eval/naive_ft").rglob("*.json"))
    after = {r.info.run_id for r in c.search_runs([exp.experiment_id], "tags.dvc_stage = 'evaluate@naive_ft-0'")}
    assert after == before  # no evaluation run was created


def test_report_refuses_a_non_finite_metric_read_back_from_mlflow():
    values = {"ppl": {32: 5.0, 64: float("nan")}, "val_ppl": {32: 6.0, 64: 7.0}}
    with pytest.raises(NonFiniteError, match=r"MLflow run abc \(clex, seed 1, protocol progressive\): metric ppl at "
                                             r"length 64 is nan \(1 non-finite values\); the report refuses"):
        rows("clex", 1, "progressive", "abc", values, [32, 64], ["ppl", "val_ppl"])
    assert NonFiniteError.kind == "non-finite result"  # the CLI's header; exit 2 as for every ParamsError


def test_moved_study_sends_artifacts_to_its_new_folder(trained_study, tmp_path):
    """MLflow keeps absolute artifact locations; after `mv a b` the study's own store is rewritten to b/mlruns
    before anything is logged: nothing is recreated at the old path, old runs' artifacts are found in b."""
    import mlflow

    a, b = tmp_path / "a", tmp_path / "b"
    originals = sorted(p.name for p in (trained_study / "mlruns").rglob("*"))
    shutil.copytree(trained_study, a)  # a copy: its store still points at trained_study/mlruns
    run(a, "clex", "evaluate", "base")
    c = mlflow.MlflowClient(f"sqlite:///{a / 'mlflow.db'}")
    assert c.get_experiment_by_name("clex-study").artifact_location == (a / "mlruns").as_uri()
    a.rename(b)
    proc = run(b, "clex", "evaluate", "base")
    assert f"its artifact locations now point to {b / 'mlruns'}" in proc.stderr
    assert not a.exists(), "the old study path was recreated"
    assert sorted(p.name for p in (trained_study / "mlruns").rglob("*")) == originals
    c = mlflow.MlflowClient(f"sqlite:///{b / 'mlflow.db'}")
    exp = c.get_experiment_by_name("clex-study")
    assert exp.artifact_location == (b / "mlruns").as_uri()
    runs = c.search_runs([exp.experiment_id])
    assert runs and all(r.info.artifact_uri.startswith((b / "mlruns").as_uri() + "/") for r in runs)
    latest = [r for r in runs if r.data.tags.get("dvc_stage") == "evaluate_base"][0]  # newest first
    assert "eval" in [f.path for f in c.list_artifacts(latest.info.run_id)]
    pretrain = [r for r in runs if r.data.tags.get("dvc_stage") == "pretrain"][0]
    assert "run.json" in [f.path for f in c.list_artifacts(pretrain.info.run_id)]  # moved with the folder


def test_relative_corpus_glob_is_read_from_the_study_root(tmp_path, capsys, monkeypatch):
    """`clex --root study prepare` run from another folder reads `data.files: corpus/**/*.txt` under the study
    (it used to glob the current folder: "matches no file"), with document ids relative to the study root, so the
    split is the one a run from the study folder gives."""
    study = tmp_path / "study"
    params = tiny_params()
    params["data"] = {**params["data"], "source": "files", "files": "corpus/**/*.txt"}
    _corpus(study / "corpus" / "sub", {f"{Path(n).stem}.txt": (STDLIB / n).read_bytes() for n in SOURCES})
    make_study(study, params)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc, err = _clex(study, capsys, "prepare")
    assert rc == 0, err
    split = json.loads((study / "build/data/manifest.json").read_text())["split"]
    assert sorted(sum(split.values(), [])) == sorted(f"corpus/sub/{Path(n).stem}.txt" for n in SOURCES)
    assert not any(elsewhere.iterdir())


def test_full_disk_while_writing_an_eval_json(trained_study, tmp_path):
    """The eval JSON's temporary file is on a full device (a link to /dev/full, where every write fails with
    ENOSPC): one line naming the output and exit 1, no eval JSON and no partial file, the evaluation runs FAILED;
    the rerun succeeds.
    (The checkpoint's case: test_resume.py::test_full_disk_while_writing_a_checkpoint.)"""
    import mlflow

    study = tmp_path / "study"
    shutil.copytree(trained_study, study, ignore=shutil.ignore_patterns("eval", "resume"))
    partial = study / "build/eval/.partial"
    partial.mkdir(parents=True)
    (partial / "base.json").symlink_to("/dev/full")
    c = mlflow.MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    exp_id = c.get_experiment_by_name("clex-study").experiment_id
    before = {r.info.run_id for r in c.search_runs([exp_id], "tags.dvc_stage = 'evaluate_base'")}  # other tests'
    proc = run(study, "clex", "evaluate", "base", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "clex evaluate: no space to write\n[Errno 28] No space left on device" in proc.stderr
    assert str(study / "build/eval/base.json") in proc.stderr  # the output it could not write
    assert not (study / "build/eval/base.json").exists() and not partial.exists()  # nothing half-written left
    evaluations = [r for r in c.search_runs([exp_id], "tags.dvc_stage = 'evaluate_base'") if r.info.run_id not in before]
    assert [r.info.status for r in evaluations] == ["FAILED"] * len(tiny_params()["eval"]["protocols"])
    run(study, "clex", "evaluate", "base")  # space again: the link to /dev/full went with the partial folder
    assert json.loads((study / "build/eval/base.json").read_text())["ppl"] and not partial.exists()
