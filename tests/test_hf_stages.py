"""A study on a Hugging Face checkpoint (`model: {source: hf, path: ...}`, docs/hf.md "Running the study on a
checkpoint") through the same commands as the decoder's: prepare with the checkpoint's tokenizer, pretrain = adopt
the checkpoint, fine-tune into an `hf/` folder, evaluate, report, DVC; MLflow runs, tags and lineage; the saved
folder loads in plain transformers and reproduces the evaluation; DDP on two CPU processes; bad params refused.

The checkpoint is a tiny random LLaMA (2 layers, 2 heads, 1 KV head: GQA) with a byte-level BPE trained here, made
offline in a temporary folder. The full `dvc repro ablations/discrete_vs_continuous` on it is marked slow (about
3.5 CPU-minutes, 9 wall-minutes on a loaded 2-core machine); the default path reproduces a one-experiment ablation.
"""
from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from clex import layout, tracking
from clex.config import ModelConfig, ParamsError, finetune_param_keys, load_study
from conftest import make_study, run, tiny_params

SMOKE = "hf_smoke"  # a one-experiment ablation: the default-suite path through dvc repro and the report


def make_checkpoint(folder: Path) -> Path:
    """A random LlamaForCausalLM (hidden 32, 2 layers, 2 heads, 1 KV head, L = 32, rope_theta 10000) and its
    tokenizer (a byte-level BPE trained on a few stdlib files, EOS <|endoftext|>), saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / n).read_text() for n in ("textwrap.py", "string.py", "bisect.py", "heapq.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      eos_token_id=fast.eos_token_id, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def hf_params(path: Path | str, seeds: list[int] = [0]) -> dict:
    """The tiny profile on the checkpoint at `path`: no reuse experiment HF cannot run (attention log scale,
    streaming window)."""
    params = tiny_params()
    params["model"].update(source="hf", path=str(path))
    params["finetune"]["seeds"] = seeds
    params["reuse_experiments"] = ["dynamic_ntk"]
    return params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def hf_study(tmp_path_factory, checkpoint):
    """An hf study after `dvc repro ablations/hf_smoke` (validate, prepare, pretrain, evaluate_base,
    finetune@clex-0, evaluate@clex-0, the report), and that command's output."""
    study = make_study(tmp_path_factory.mktemp("hf_study"), hf_params(checkpoint))
    (study / "ablations" / SMOKE).mkdir()
    (study / "ablations" / SMOKE / "ablation.yaml").write_text("question: smoke\nknob: none\nexperiments: [clex]\n")
    run(study, "clex", "pipeline")
    return study, run(study, "dvc", "repro", f"ablations/{SMOKE}")


def _runs(study: Path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("clex-study").experiment_id], max_results=1000)


def test_every_stage_runs_on_the_checkpoint(hf_study, checkpoint):
    study, proc = hf_study
    for stage in ("prepare", "pretrain", "evaluate_base", "finetune@clex-0", "evaluate@clex-0", f"ablations/{SMOKE}"):
        assert f"Running stage '{stage}'" in proc.stdout, stage
    ckpt_sha = tracking.folder_sha256(checkpoint)

    # prepare: the checkpoint's tokenizer, no special tokens inside documents, EOS between them
    from transformers import AutoTokenizer

    data = layout.data_dir(study)
    manifest = json.loads((data / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    assert manifest["model_sha256"] == ckpt_sha and manifest["token_dtype"] == "uint16"
    assert manifest["vocab_size"] == len(tok) and manifest["eos_id"] == tok.eos_token_id
    with np.load(data / "test.npz") as z:
        tokens, ids = z["tokens"], [str(i) for i in z["ids"]]
    text = (Path(manifest["stdlib"]) / ids[0]).read_text()
    assert tokens[0].tolist() == tok(text, add_special_tokens=False)["input_ids"][:tokens.shape[1]]
    train = np.fromfile(data / "train.bin", dtype=np.uint16)
    assert int((train == tok.eos_token_id).sum()) == manifest["counts"]["train_documents"]
    assert (data / "tokenizer.json").is_file()
    assert str(checkpoint) in yaml.safe_load((study / "dvc.yaml").read_text())["stages"]["prepare"]["deps"]

    # pretrain adopts the checkpoint: no weights copied, its folder hash is the base checkpoint hash
    base = layout.base_dir(study)
    assert sorted(p.name for p in base.iterdir()) == ["frequencies.json", "run.json", "source.json"]
    base_info = json.loads((base / "run.json").read_text())
    assert base_info["checkpoint_sha256"] == ckpt_sha and base_info["steps"] == 0
    assert json.loads((base / "source.json").read_text())["path"] == str(checkpoint)
    inv = json.loads((base / "frequencies.json").read_text())["inv_freq"][0]
    assert np.allclose(inv, 10000.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)  # plain RoPE at head dim 16

    # MLflow: the runs, tags and lineage of the decoder's pipeline, plus model_source and the real shape
    runs = _runs(study)
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags["dvc_stage"], []).append(r)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["role"] for r in runs} == {"pretrain", "finetune", "evaluate", "report"}
    assert all(r.data.tags.get("model_source") == "hf" for r in runs)
    (pretrain,), (finetune,) = by_stage["pretrain"], by_stage["finetune@clex-0"]
    assert pretrain.info.run_id == base_info["run_id"] and pretrain.data.tags["checkpoint_sha256"] == ckpt_sha
    assert pretrain.data.params["shape.n_kv_heads"] == "1" and pretrain.data.params["shape.head_dim"] == "16"
    assert pretrain.data.params["model.source"] == "hf" and int(pretrain.data.params["n_params"]) == 2 * 300 * 32 + (
        2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32) + 32)
    info = json.loads((layout.finetune_dir(study, "clex", 0) / "run.json").read_text())
    folder = layout.finetune_dir(study, "clex", 0) / "hf"
    assert info["run_id"] == finetune.info.run_id and info["checkpoint_sha256"] == tracking.folder_sha256(folder)
    assert finetune.data.tags["base_checkpoint_sha256"] == ckpt_sha
    assert finetune.data.tags["checkpoint_sha256"] == info["checkpoint_sha256"]
    assert finetune.data.params["shape.n_layers"] == "2" and finetune.data.params["model.path"] == str(checkpoint)
    for name, trained_by in (("base", pretrain), ("clex", finetune)):
        record = json.loads(layout.eval_path(study, name, 0).read_text())
        assert record["train_run_id"] == trained_by.info.run_id
        assert record["checkpoint_sha256"] == trained_by.data.tags["checkpoint_sha256"]
        evals = [r for r in runs if r.data.tags["role"] == "evaluate" and r.data.tags["experiment"] == name]
        assert len(evals) == 2 and {r.data.tags["mlflow.parentRunId"] for r in evals} == {trained_by.info.run_id}
        assert all(np.isfinite(v) for v in record["ppl"].values()) and set(record["passkey"]) == {"32", "64", "128"}

    table = (study / "reports" / SMOKE / "table.md").read_text()
    assert "| clex |" in table and "| base (plain RoPE, no fine-tune) |" in table
    assert (study / "reports" / SMOKE / "ppl_vs_length.png").stat().st_size > 10_000
    assert set(json.loads((study / "reports" / SMOKE / "metrics.json").read_text())) == {"base", "clex"}


def test_saved_folder_loads_in_transformers_and_reproduces_the_evaluation(hf_study):
    """The fine-tune's hf/ folder loads in plain transformers (no missing or unexpected keys, the same weights);
    clex's loader is deterministic and reproduces the eval JSON's PPL at L exactly; at L the context is one chunk
    at t = 1, where CLEX's θ(1) is plain RoPE, so the plain HF model (its own RoPE) gives the same PPL."""
    from transformers import AutoModelForCausalLM

    from clex.checkpoint import checkpoint_path, load_checkpoint
    from clex.evaluate import perplexity

    study_root, _ = hf_study
    study = load_study(study_root)
    folder = checkpoint_path(study, layout.finetune_dir(study_root, "clex", 0))
    plain, loading = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    model = load_checkpoint(study, study.experiment("clex"), folder)
    ours = {k.removeprefix("hf."): v for k, v in model.state_dict().items() if ".rotary_emb." not in k}
    ours = {k: v for k, v in ours.items() if not k.startswith("rope.")}
    assert ours.keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in ours.items())
    saved_rope = torch.load(folder / "clex_rope.pt", weights_only=True)
    assert saved_rope and all(torch.equal(v, model.rope.state_dict()[k]) for k, v in saved_rope.items())

    p, L = study.params, study.params.model.train_len
    record = json.loads(layout.eval_path(study_root, "clex", 0).read_text())
    with np.load(layout.data_dir(study_root) / "test.npz") as z:
        docs = torch.from_numpy(z["tokens"][:, :p.max_eval_len].astype("int64"))
    assert perplexity(model, docs, L, p.eval, record["primary"])["ppl"] == record["ppl"][str(L)]
    again = load_checkpoint(study, study.experiment("clex"), folder).eval()
    with torch.no_grad():
        assert torch.equal(model.eval()(docs[:, :L]), again(docs[:, :L]))
        windows = docs[:, :p.max_eval_len].reshape(-1, L)
        logits = plain(windows).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="sum")
    assert np.isclose(np.exp(nll.item() / windows[:, 1:].numel()), record["ppl"][str(L)], rtol=1e-5)


def test_reuse_loads_its_own_encoding_and_faults_name_the_folder(hf_study):
    """A reuse experiment evaluates the saved weights with its own encoding (the saved encoding state is loaded
    only for the spec it was saved with); nonfinite_cause names the folder and the bad tensor; generation runs
    through the re-rotating cache and equals greedy decoding by full forwards."""
    from clex.checkpoint import checkpoint_path, load_checkpoint
    from clex.evaluate import nonfinite_cause
    from clex.generate import run_generate
    from clex.rope.scaling import DynamicNtk

    study_root, _ = hf_study
    study = load_study(study_root)
    folder = checkpoint_path(study, layout.finetune_dir(study_root, "clex", 0))
    clex = load_checkpoint(study, study.experiment("clex"), folder)
    ntk = load_checkpoint(study, study.experiment("dynamic_ntk"), folder)
    assert isinstance(ntk.rope, DynamicNtk) and torch.equal(ntk.hf.lm_head.weight, clex.hf.lm_head.weight)
    assert "overflow in the forward" in nonfinite_cause(clex, folder)
    with torch.no_grad():
        clex.hf.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    cause = nonfinite_cause(clex, folder)
    assert str(folder) in cause and "hf.model.layers.1.mlp.up_proj.weight (1 NaN/inf values)" in cause

    result = run_generate(study, "clex", 0, prompt_tokens=8, max_new_tokens=4, device="cpu")
    model = load_checkpoint(study, study.experiment("clex"), folder).eval()
    ids = list(result["prompt_ids"])
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert result["generated_ids"] == ids[8:] and result["checkpoint"] == str(folder)


def test_finetune_ddp_two_cpu_processes_logs_one_run(hf_study, checkpoint):
    study, _ = hf_study
    params = hf_params(checkpoint, seeds=[0, 1])
    params["trainer"].update(devices=2, strategy="ddp", accelerator="cpu")
    (study / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        run(study, "clex", "finetune", "clex", "--seed", "1")
    finally:  # the study is shared by the module
        (study / "params.yaml").write_text(yaml.safe_dump(hf_params(checkpoint)))
    mine = [r for r in _runs(study) if r.data.tags.get("dvc_stage") == "finetune@clex-1"]
    assert len(mine) == 1 and mine[0].info.status == "FINISHED" and mine[0].data.tags["model_source"] == "hf"
    info = json.loads((layout.finetune_dir(study, "clex", 1) / "run.json").read_text())
    assert info["run_id"] == mine[0].info.run_id
    assert info["train_tokens"] == 3 * 2 * 4 * 32  # steps x ranks x batch x L: both ranks trained
    assert info["checkpoint_sha256"] == tracking.folder_sha256(layout.finetune_dir(study, "clex", 1) / "hf")


def test_bad_hf_params_are_refused_naming_the_key(tmp_path, checkpoint):
    study = make_study(tmp_path / "study", hf_params(checkpoint))

    def refused(params: dict, *expected: str) -> None:
        (study / "params.yaml").write_text(yaml.safe_dump(params))
        with pytest.raises(ParamsError) as e:
            load_study(study)
        assert all(s in str(e.value) for s in expected), str(e.value)

    missing = hf_params(checkpoint)
    missing["model"]["path"] = None
    (study / "params.yaml").write_text(yaml.safe_dump(missing))
    proc = run(study, "clex", "validate", check=False)  # the CLI: exit 2, one message, nothing written
    assert proc.returncode == 2 and "model.path: required when model.source is 'hf'" in proc.stderr
    assert not layout.validated(study).exists()
    refused(hf_params(tmp_path / "nowhere"), "model.path", "does not exist", "config.json")
    (tmp_path / "empty").mkdir()
    refused(hf_params(tmp_path / "empty"), "model.path", "no readable config.json")
    shutil.copytree(checkpoint, tmp_path / "qwen3")
    config = json.loads((tmp_path / "qwen3/config.json").read_text())
    (tmp_path / "qwen3/config.json").write_text(json.dumps({**config, "model_type": "qwen3"}))
    refused(hf_params(tmp_path / "qwen3"), "model.path", "'qwen3'", "allowed: ['llama', 'mistral', 'qwen2']")
    listed = hf_params(checkpoint)
    listed["reuse_experiments"] = ["dynamic_ntk", "streaming"]
    refused(listed, "reuse_experiments: 'streaming'", "streaming:", "allowed with model.source 'hf'")
    (study / "experiments/clex_log.yaml").write_text("extends: clex\nattn_log_scale: true\n")
    listed = hf_params(checkpoint)
    listed["experiments"] = listed["experiments"] + ["clex_log"]
    refused(listed, "experiments: 'clex_log'", "attn_log_scale: true", "allowed with model.source 'hf': false")
    flash = hf_params(checkpoint)
    flash["model"]["attn_implementation"] = "flash_attention_2"
    refused(flash, "experiments: 'alibi'", "rope.type: 'alibi'", "attn_implementation")
    # an ablation comparing a knob HF does not have is not part of an hf study; the others are
    (study / "experiments/clex_log.yaml").unlink()
    (study / "params.yaml").write_text(yaml.safe_dump(hf_params(checkpoint)))
    ablations = set(load_study(study).ablations)
    assert "attention_log_scale" not in ablations and "baselines" not in ablations and "recipe" in ablations


def test_decoder_study_dumps_stay_as_before_and_dvc_tracks_the_new_keys(tmp_path):
    """The hf keys are DVC params of the training stages but absent from a decoder study's dumps, so its config
    hashes, resume keys and MLflow params are unchanged; token arrays above 65,535 ids are uint32 and read back."""
    from clex.data import load_tokens, token_dtype

    assert list(ModelConfig().model_dump()) == ["d_model", "n_layers", "n_heads", "d_ff", "rope_base", "train_len",
                                                "init_std"]
    assert {"model.source", "model.path", "model.attn_implementation"} <= set(finetune_param_keys())
    assert token_dtype(65535) is np.uint16 and token_dtype(65536) is np.uint32
    stream = np.array([0, 65535, 65536, 128255], dtype=np.uint32)
    stream.tofile(tmp_path / "train.bin")
    (tmp_path / "manifest.json").write_text(json.dumps({"token_dtype": "uint32"}))
    assert load_tokens(tmp_path, "train").tolist() == stream.tolist()


def test_folder_sha256_covers_names_and_contents_not_location(tmp_path):
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "x.bin").write_bytes(b"x")
    (a / "sub/y.json").write_text("{}")
    h = tracking.folder_sha256(a)
    shutil.copytree(a, tmp_path / "b")
    assert tracking.folder_sha256(tmp_path / "b") == h  # where it lies does not count
    (a / ".cache").mkdir()
    (a / ".cache/meta").write_text("download bookkeeping")
    assert tracking.folder_sha256(a) == h  # hidden files do not count
    (a / "sub/y.json").rename(a / "sub/z.json")
    assert tracking.folder_sha256(a) != h  # a name does
    (a / "sub/z.json").rename(a / "sub/y.json")
    (a / "x.bin").write_bytes(b"y")
    assert tracking.folder_sha256(a) != h  # and a content


@pytest.mark.slow
def test_dvc_repro_discrete_vs_continuous_on_a_checkpoint(tmp_path, checkpoint):
    """The study's central ablation, unchanged, on the checkpoint (about 3.5 CPU-minutes)."""
    study = make_study(tmp_path / "study", hf_params(checkpoint, seeds=[0, 1]))
    run(study, "dvc", "repro", "ablations/discrete_vs_continuous", timeout=1800)
    table = (study / "reports/discrete_vs_continuous/table.md").read_text()
    assert all(f"| {e} |" in table for e in ("naive_ft", "clex", "clex_discrete")) and " ± " in table
    assert {r.data.tags["role"] for r in _runs(study)} == {"pretrain", "finetune", "evaluate", "report"}
