"""Recipe knobs (issue 10): AdamW betas, gradient accumulation with one t per micro-batch, the position
encoding's own learning rate (rope_lr, or rope_step / S), experiment-level `finetune:` overrides; and the
basis monitor that logs how far ln θ(t) has moved from its prior while a CLEX fine-tune trains."""
from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from scipy.integrate import quad_vec
from torch.utils.data import DataLoader

from clex.config import FinetuneConfig, ModelConfig, ParamsError, load_study
from clex.lit import (
    BasisMonitor, LitDecoder, basis_metrics, log_frequencies, monitor_scales, resolve_rope_lr, step_generator,
)
from clex.model import Decoder
from clex.rope import (
    ClexSpec, ContinuousClex, DiscreteClex, RopeSpec, build_position_encoding, effective_step_scale, ntk_inv_freq,
    sample_scale, training_positions,
)
from clex.sweep import trial_optim
from conftest import make_study, run, tiny_params

CFG = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, train_len=16)  # head dim 16


def tiny_model(dynamics: str = "continuous", t_max: int = 8) -> Decoder:
    spec = RopeSpec(type="rope") if dynamics == "plain" else ClexSpec(type="clex", dynamics=dynamics, t_max=t_max)
    torch.manual_seed(0)
    rope = build_position_encoding(spec, head_dim=CFG.head_dim, base=CFG.rope_base, train_len=CFG.train_len)
    return Decoder(CFG, 50, rope)


def finetune_cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"steps": 4, "batch_size": 8, "lr": 1e-3, **kw})


# ------------------------------------------------------------------ params
@pytest.mark.parametrize("override,words", [
    ({"accumulate": 3}, ["params.yaml: finetune.accumulate: got 3", "batch_size=4"]),
    ({"betas": [0.9, 1.0]}, ["finetune.betas.1: got 1.0"]),
    ({"betas": [0.9]}, ["finetune.betas: got [0.9]"]),
    ({"rope_lr": 1e-3, "rope_step": 0.1}, ["finetune.rope_lr: 0.001 and finetune.rope_step: 0.1", "at most one"]),
    ({"rope_lr": -1.0}, ["finetune.rope_lr: got -1.0"]),
    ({"rope_step": 0}, ["finetune.rope_step: got 0"]),
])
def test_bad_recipe_params_name_key_and_value(tmp_path, override, words):
    params = tiny_params()
    params["finetune"].update(override)
    make_study(tmp_path, params)
    with pytest.raises(ParamsError) as e:
        load_study(tmp_path)
    assert all(w in str(e.value) for w in words), str(e.value)


def set_finetune(path, override: dict) -> None:
    """Replace the experiment file's `finetune:` overrides (clex.yaml has its own: accumulate 4)."""
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "finetune": override}))


@pytest.mark.parametrize("override,words", [
    ({"accumulate": 3}, ["experiments/clex.yaml: finetune.accumulate: got 3"]),
    ({"seeds": [5]}, ["experiments/clex.yaml: finetune.seeds: [5]", "but seeds"]),
    ({"bogus": 1}, ["experiments/clex.yaml: finetune.bogus: got 1"]),
    ({"rope_lr": 0.1, "rope_step": 0.1}, ["experiments/clex.yaml: finetune.rope_lr: 0.1 and finetune.rope_step"]),
    ({"steps": 5}, ["experiments/clex.yaml: finetune.steps: 5", "sweep.val_every_n_steps"]),  # clex is swept
])
def test_bad_experiment_overrides_name_the_experiment_file(tmp_path, override, words):
    study = make_study(tmp_path)
    if "steps" in override:  # the tiny sweep reports every step: make it every 2 so 5 steps are refused
        params = tiny_params()
        params["sweep"].update(val_every_n_steps=2, prune_after_steps=1)
        params["finetune"]["steps"] = 4
        (study / "params.yaml").write_text(yaml.safe_dump(params))
    set_finetune(study / "experiments" / "clex.yaml", override)
    with pytest.raises(ParamsError) as e:
        load_study(study)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_finetune_config_merges_overrides_and_extends(tmp_path):
    study = make_study(tmp_path)
    set_finetune(study / "experiments" / "clex.yaml", {"lr": 2.0e-5, "betas": [0.9, 0.999], "accumulate": 2})
    (study / "experiments" / "clex_child.yaml").write_text("extends: clex\nfinetune: {rope_step: 0.05}\n")
    s = load_study(study)
    base = s.params.finetune
    assert s.finetune_config("naive_ft") == base
    child = s.finetune_config("clex_child")
    assert trial_optim(s) == s.finetune_config("clex")  # the sweep's trials (sweep.experiment: clex)
    assert trial_optim(s).lr == 2e-5
    assert (child.lr, child.betas, child.accumulate, child.rope_step) == (2e-5, [0.9, 0.999], 2, 0.05)
    assert child.seeds == base.seeds and child.steps == base.steps
    defaults = yaml.safe_load((study / "params.yaml").read_text())
    assert defaults["finetune"]["betas"] == [0.9, 0.95] and defaults["finetune"]["accumulate"] == 1
    assert defaults["finetune"]["rope_lr"] is None and defaults["finetune"]["rope_step"] == 0.08  # ablations/recipe
    assert defaults["pretrain"]["betas"] == [0.9, 0.95] and defaults["pretrain"]["accumulate"] == 1


def test_time_embedding_base_reaches_the_ode():
    kw = dict(head_dim=32, base=500.0, train_len=64)
    official = build_position_encoding(ClexSpec(type="clex"), **kw)
    model = build_position_encoding(ClexSpec(type="clex", time_embedding_base="model"), **kw)
    other = build_position_encoding(ClexSpec(type="clex", time_embedding_base=2000), **kw)
    assert (official.dynamics.embed.base, model.dynamics.embed.base, other.dynamics.embed.base) == (10000.0, 500.0, 2000.0)
    assert official.base == model.base == 500.0  # the RoPE base itself is the model's
    # the embedding enters the NN input only: the same prior at W_down = 0, different θ(t) once it is trained
    assert torch.equal(official.inv_freq(8), model.inv_freq(8))
    for enc in (official, model):
        torch.manual_seed(0)
        with torch.no_grad():
            enc.dynamics.ffn.w_up.copy_(torch.randn(enc.dynamics.ffn.w_up.shape) * 0.2)
            enc.dynamics.ffn.w_down.copy_(torch.randn(enc.dynamics.ffn.w_down.shape) * 0.05)
    assert ((official.inv_freq(8) - model.inv_freq(8)).abs() / model.inv_freq(8)).max() > 1e-2


# ------------------------------------------------------------------ S: the effective step of one Adam update
def test_discrete_scale_at_init_is_the_closed_form():
    enc = DiscreteClex(32, 10000.0, 64, 8)
    for t in (2, 5, 8):
        e_t = enc.embedding.weight[t - 1].detach().double()
        closed = torch.nn.functional.silu(e_t @ enc.ffn.w_up.detach().double()).abs().sum().item()
        assert effective_step_scale(enc, t) == pytest.approx(closed, rel=1e-5)
    assert effective_step_scale(enc, 1) == 0.0  # t = 1: the base frequencies


@pytest.mark.parametrize("act", ["silu", "tanh"])
def test_continuous_scale_at_init_is_the_integral_of_the_activations(act):
    """At W_down = 0, ∂z_j(t)/∂W_down[k, j] = ∫₁ᵗ h_k(s) ds and nothing else moves z_j, with
    h(s) = act(2·ln θ^NTK(s)·W_up) along the NTK prior (the input is z + ln θ^NTK, z = ln θ^NTK):
    computed here by float64 adaptive quadrature, from the formulas, not the module."""
    d, b, t = 32, 10000.0, 16
    torch.manual_seed(0)
    enc = ContinuousClex(d, b, 128, t, act=act, method="rk4", variable="log_t", step_size=0.25)
    w_up = enc.dynamics.ffn.w_up.detach().double().numpy()
    i = np.arange(d // 2)
    f = np.tanh if act == "tanh" else (lambda x: x / (1 + np.exp(-x)))

    def h(s):
        log_ntk = -(2 * i / d) * math.log(b) - (2 * i / (d - 2)) * math.log(2 * s - 1)
        return f((2 * log_ntk) @ w_up)

    integral, _ = quad_vec(h, 1, t, epsabs=1e-10, epsrel=1e-10)
    assert effective_step_scale(enc) == pytest.approx(np.abs(integral).sum(), rel=1e-3)


@pytest.mark.parametrize("head_dim,low,high", [(32, 800, 1300), (128, 3300, 5000)])
def test_scale_matches_the_issue_figures(head_dim, low, high):
    """Issue 10 / docs/method.md §10: S ≈ 1,000 at head dim 32 and ≈ 4,100 at 128 (silu, t = 16, λ = 1)."""
    torch.manual_seed(0)
    enc = build_position_encoding(ClexSpec(type="clex"), head_dim=head_dim, base=10000.0, train_len=128)
    assert low < effective_step_scale(enc) < high


def test_rope_step_moves_z_by_about_that_much_in_one_adam_update():
    """The meaning of rope_step: one AdamW update at rope lr = rope_step / S moves max_j |Δz_j(t_max)| by about
    rope_step when the loss pushes that z_j (Adam's first update is lr·sign(g) per parameter)."""
    for dynamics in ("continuous", "discrete"):
        model = tiny_model(dynamics)
        rope = model.rope
        lr, scale = resolve_rope_lr(finetune_cfg(rope_step=0.05), rope)
        assert lr == pytest.approx(0.05 / scale) and scale == effective_step_scale(rope)
        z0 = rope.inv_freq(8).detach().log()
        j = 3  # at init every z_j(t) has the same S (only W_down[:, j] moves it, by the same activations)
        opt = torch.optim.AdamW(rope.parameters(), lr=lr, weight_decay=0.0)
        (-rope.inv_freq(8).log()[j]).backward()
        opt.step()
        assert rope.inv_freq(8).detach().log()[j] - z0[j] == pytest.approx(0.05, rel=0.1), dynamics


def test_rope_lr_and_step_resolution():
    model = tiny_model()
    assert resolve_rope_lr(finetune_cfg(), model.rope)[0] == 1e-3  # null: finetune.lr
    assert resolve_rope_lr(finetune_cfg(rope_lr=2e-5), model.rope)[0] == 2e-5
    assert resolve_rope_lr(finetune_cfg(rope_step=0.1), tiny_model("plain").rope) == (1e-3, None)  # nothing to scale
    one = tiny_model(t_max=1)
    with pytest.raises(ParamsError, match="finetune.rope_step: 0.1.*S = 0"):
        resolve_rope_lr(finetune_cfg(rope_step=0.1), one.rope)


# ------------------------------------------------------------------ the optimiser
def test_knobs_reach_the_optimiser():
    model = tiny_model()
    lit = LitDecoder(model, finetune_cfg(betas=[0.8, 0.99], weight_decay=0.05), seed=0, rope_lr=3e-5)
    opt = lit.configure_optimizers()["optimizer"]
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["body_decay", "body_no_decay", "rope"]
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert members["rope"] == {n for n, _ in model.named_parameters() if n.startswith("rope.")}
    assert members["body_decay"] == {n for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith("rope.")}
    assert set().union(*members.values()) == set(names.values()) and sum(map(len, members.values())) == len(names)
    assert [g["lr"] for g in groups.values()] == [1e-3, 1e-3, 3e-5]
    assert [g["weight_decay"] for g in groups.values()] == [0.05, 0.0, 0.0]
    assert all(g["betas"] == (0.8, 0.99) for g in opt.param_groups)


def test_rope_lr_zero_freezes_the_encoding():
    model = tiny_model("discrete")
    lit = LitDecoder(model, finetune_cfg(rope_lr=0.0), seed=0, rope_lr=0.0)
    opt = lit.configure_optimizers()["optimizer"]
    assert [g["name"] for g in opt.param_groups] == ["body_decay", "body_no_decay"]
    assert not any(p.requires_grad for p in model.rope.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("rope."))
    before = {k: v.clone() for k, v in model.rope.state_dict().items()}
    fit(lit, steps=2, batch=4)
    assert all(torch.equal(before[k], v) for k, v in model.rope.state_dict().items())


class Recorder(LitDecoder):
    """Records (global step, micro-batch, t, positions) of every training forward."""

    def training_step(self, batch, batch_idx):
        self.draws = getattr(self, "draws", [])
        t, positions = self.scale_and_positions(batch.shape[1] - 1, micro=batch_idx % self.optim.accumulate)
        self.draws.append((self.global_step, batch_idx % self.optim.accumulate, t, positions))
        return super().training_step(batch, batch_idx)


def fit(lit: LitDecoder, steps: int, batch: int, accumulate: int = 1) -> None:
    data = torch.randint(0, 50, (steps * batch, CFG.train_len + 1), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, accelerator="cpu", precision="32-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lit, DataLoader(data, batch_size=batch // accumulate))
    assert trainer.global_step == steps


def test_accumulation_draws_one_t_per_micro_batch():
    seed, steps = 3, 3
    one = Recorder(tiny_model(t_max=16), finetune_cfg(steps=steps), seed=seed, position_sampling="random")
    fit(one, steps, batch=8)
    # accumulate 1 is exactly the one-draw-per-step stream: t ~ U{1..t_max} from step_generator(seed, step)
    assert [(s, t) for s, _, t, _ in one.draws] == [(s, sample_scale(16, step_generator(seed, s))) for s in range(steps)]
    four = Recorder(tiny_model(t_max=16), finetune_cfg(steps=steps, accumulate=4), seed=seed, position_sampling="random")
    fit(four, steps, batch=8, accumulate=4)
    assert [(s, m) for s, m, _, _ in four.draws] == [(s, m) for s in range(steps) for m in range(4)]
    for s in range(steps):
        draws = [(t, p) for step, _, t, p in four.draws if step == s]
        assert [t for t, _ in draws] == [sample_scale(16, step_generator(seed, s, m)) for m in range(4)]
        assert draws[0][0] == one.draws[s][2] and torch.equal(draws[0][1], one.draws[s][3])  # micro 0 = today's
        assert len({t for t, _ in draws}) > 1, s  # the micro-batches of one update see several t
        for m, (t, positions) in enumerate(draws):  # and each its own positions for its t, from the same generator
            gen = step_generator(seed, s, m)
            assert sample_scale(16, gen) == t and torch.equal(positions, training_positions("random", 16, t, 16, gen))


def test_accumulated_update_equals_one_batch_update_at_equal_t():
    """k micro-batches of B/k give the gradient of one batch of B (same tokens, mean loss), so with a fixed t
    (plain RoPE) accumulate 2 and 1 end at the same weights."""
    weights = []
    for k in (1, 2):
        model = tiny_model("plain")
        fit(LitDecoder(model, finetune_cfg(steps=2, accumulate=k), seed=0), steps=2, batch=8, accumulate=k)
        weights.append(model.state_dict())
    assert all(torch.allclose(weights[0][n], weights[1][n], atol=1e-6) for n in weights[0])


# ------------------------------------------------------------------ the basis monitor
def test_monitor_scales():
    assert monitor_scales(16) == [2, 4, 8, 16] and monitor_scales(12) == [2, 4, 8, 12] and monitor_scales(1) == [1]


def test_basis_metrics_of_the_prior_and_of_a_moved_basis():
    enc = ContinuousClex(32, 10000.0, 128, 16, method="rk4", variable="log_t", step_size=0.25)
    ts = monitor_scales(16)
    prior = log_frequencies(enc, ts)
    at_prior = basis_metrics(prior, prior, 16)
    assert all(at_prior[f"basis_{s}_dz_t{t}"] == 0 for t in ts for s in ("max", "mean"))
    # the NTK prior: θ_i(t)/θ_i(1) = (2t-1)^(-2i/(d-2)), from 1 (i = 0) down to 1/(2t-1)
    assert at_prior["basis_max_ratio"] == pytest.approx(1.0, rel=1e-6)
    assert at_prior["basis_min_ratio"] == pytest.approx(1 / 31, rel=1e-4)
    with torch.no_grad():
        enc.dynamics.ffn.w_down.copy_(torch.randn(enc.dynamics.ffn.w_down.shape) * 0.01)
    moved = basis_metrics(log_frequencies(enc, ts), prior, 16)
    for t in ts:
        dz = (enc.inv_freq(t).detach().double().log() - ntk_inv_freq(32, 10000.0, 2 * t - 1).double().log()).abs()
        assert moved[f"basis_max_dz_t{t}"] == pytest.approx(dz.max().item(), abs=2e-5)
        assert moved[f"basis_mean_dz_t{t}"] == pytest.approx(dz.mean().item(), abs=2e-5)
    assert moved["basis_max_dz_t16"] > 1e-3


def test_monitor_logs_on_its_steps(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = tiny_model(t_max=4)
    monitor = BasisMonitor(model.rope, every=2)
    data = torch.randint(0, 50, (5 * 4, CFG.train_len + 1), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_steps=5, accumulate_grad_batches=2, accelerator="cpu", logger=CSVLogger(tmp_path),
                        callbacks=[monitor], log_every_n_steps=100, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LitDecoder(model, finetune_cfg(steps=5, batch_size=4, accumulate=2, lr=1e-2), seed=0,
                           position_sampling="random"), DataLoader(data, batch_size=2))
    import pandas as pd

    rows = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    logged = rows.dropna(subset=["basis_max_dz_t4"])
    assert logged.step.tolist() == [2, 4, 5]  # every 2 optimizer steps, and the last
    last = basis_metrics(log_frequencies(model.rope, [2, 4]), monitor.prior, 4)
    assert logged.iloc[-1].basis_max_dz_t4 == pytest.approx(last["basis_max_dz_t4"], rel=1e-6)
    assert logged.iloc[-1].basis_max_dz_t4 > 0


# ------------------------------------------------------------------ through the pipeline's fine-tune (MLflow)
def test_recipe_finetune_records_knobs_monitor_and_solver_error(trained_study):
    import mlflow

    exp = trained_study / "experiments" / "clex_recipe_test.yaml"
    exp.write_text("extends: clex\nfinetune: {accumulate: 2, rope_step: 0.05, betas: [0.9, 0.999]}\n")
    try:
        run(trained_study, "clex", "finetune", "clex_recipe_test", "--seed", "0")
    finally:
        exp.unlink()
    out = trained_study / "build/finetune/clex_recipe_test/seed0"
    info = json.loads((out / "run.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{trained_study / 'mlflow.db'}")
    r = client.get_run(info["run_id"])
    p = r.data.params
    assert (p["finetune.accumulate"], p["finetune.betas"], p["finetune.rope_step"]) == ("2", "[0.9, 0.999]", "0.05")
    assert p["finetune.rope_lr"] == "None" and p["finetune.lr"] == "0.001"
    scale = float(p["rope_step_scale"])
    assert scale > 0 and float(p["rope_lr_resolved"]) == pytest.approx(0.05 / scale)
    params = load_study(trained_study).params
    assert info["steps"] == params.finetune.steps
    assert info["train_tokens"] == params.finetune.steps * params.finetune.batch_size * params.model.train_len
    # basis monitor: every trainer.log_every_n_steps (1 in the tiny profile) steps, at t = 2, 4, 8, 16 (t_max 16)
    steps = list(range(1, params.finetune.steps + 1))
    for t in (2, 4, 8, 16):
        for key in (f"basis_max_dz_t{t}", f"basis_mean_dz_t{t}"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == steps, key
    # ... whose last values are those of the saved frequencies against the prior: the same encoding untrained
    # (W_down = 0: the NTK prior through the configured solver), recomputed here
    freq = np.array(json.loads((out / "frequencies.json").read_text())["inv_freq"], dtype=np.float64)
    m = params.model
    untrained = build_position_encoding(ClexSpec(type="clex"), head_dim=m.head_dim, base=m.rope_base, train_len=m.train_len)
    prior = untrained.frequency_table().double().numpy()
    assert np.abs(np.log(prior[15]) - np.log(ntk_inv_freq(m.head_dim, m.rope_base, 31).double().numpy())).max() < 1e-4
    for t in (2, 4, 8, 16):
        dz = np.abs(np.log(freq[t - 1]) - np.log(prior[t - 1]))
        assert r.data.metrics[f"basis_max_dz_t{t}"] == pytest.approx(dz.max(), rel=1e-9, abs=1e-12)
        assert r.data.metrics[f"basis_mean_dz_t{t}"] == pytest.approx(dz.mean(), rel=1e-9, abs=1e-12)
    assert r.data.metrics["basis_max_dz_t16"] > 1e-2  # three updates of rope_step 0.05 moved it
    ratio = freq[15] / freq[0]
    assert r.data.metrics["basis_max_ratio"] == pytest.approx(ratio.max(), rel=1e-9)
    assert r.data.metrics["basis_min_ratio"] == pytest.approx(ratio.min(), rel=1e-9)
    assert 0 <= r.data.metrics["solver_max_rel_error"] < 1e-4
