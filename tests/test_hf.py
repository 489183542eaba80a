"""The Hugging Face model source (clex/hf.py) against our Decoder and against transformers' own RoPE variants.

Tiny random models (no hub): our Decoder mapped into a LlamaForCausalLM, or Mistral/Qwen2 built from their configs
and saved with `save_pretrained` to a temp folder. Everything in float32, on the CPU. Tolerance: max |Δ logit| <= TOL
(1e-5). The mapping is exact: measured 0.0 for every rotary encoding (plain, PI, YaRN, Dynamic NTK, CLEX,
RandomPos), in a full forward, through the progressive KV cache and in training mode. ALiBi/Sandwich differ by
up to 2.1e-6 (logits of magnitude ~10): the same SDPA call with a float mask, on differently strided q/k/v.
Gradients of the encoding's weights and of the embedding: rtol 1e-4 (measured <= 2e-6 relative, CLEX at t = 3).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

from clex.attention import CausalAttention, StreamingAttention
from clex.config import Experiment, ModelConfig, OptimConfig, ParamsError, StreamingSpec
from clex.evaluate import progressive_logits
from clex.generate import generate
from clex.hf import (
    ROPE_SPEC, ROPE_WEIGHTS, HFDecoder, build_hf_model, from_decoder, llama_config, llama_state_dict, load_hf_model,
    to_llama,
)
from clex.lit import LitDecoder, scale_and_positions
from clex.model import Decoder
from clex.rope import (
    AlibiSpec, ClexSpec, DynamicNtkSpec, PiSpec, RandomPosSpec, RopeSpec, SandwichSpec, YarnSpec,
    build_position_encoding,
)
from test_rope import randomise

TOL = 1e-5
L, V = 16, 97
CFG = ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=96, train_len=L, init_std=0.1)
CLEX = ClexSpec(type="clex", t_max=4)
SPECS = {
    "rope": RopeSpec(type="rope"), "pi": PiSpec(type="pi", factor=4), "yarn": YarnSpec(type="yarn", factor=4),
    "dynamic_ntk": DynamicNtkSpec(type="dynamic_ntk", factor=2), "clex": CLEX,
    "clex_discrete": ClexSpec(type="clex", t_max=4, dynamics="discrete"),
    "randompos": RandomPosSpec(type="randompos", max_position_factor=4), "alibi": AlibiSpec(type="alibi"),
    "sandwich": SandwichSpec(type="sandwich", d_bar=16),
}


def decoder(name: str, seed: int = 0) -> Decoder:
    """Our Decoder with a random body; a learned encoding gets non-zero weights, so θ(t) really depends on t."""
    torch.manual_seed(seed)
    rope = build_position_encoding(SPECS[name], head_dim=CFG.head_dim, base=CFG.rope_base, train_len=L)
    model = Decoder(CFG, V, rope)
    if any(True for _ in rope.parameters()):
        randomise(rope, seed, scale=0.3)
    return model.eval()


def tokens(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, n), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------ (a) our Decoder's weights in a LlamaForCausalLM
HF_ROPE = {"rope": {"rope_type": "default"}, "pi": {"rope_type": "linear", "factor": 4.0},
           "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}}


@pytest.mark.parametrize("name", list(HF_ROPE))
def test_decoder_weights_in_vanilla_llama_give_the_same_logits(name):
    """LLaMA with its own rotary module (default, linear, yarn) = our Decoder with ours, beyond L too. The
    architectures agree (llama_config: RMSNorm eps 1e-6, SwiGLU, no biases, tied embeddings, no GQA)."""
    ours = decoder(name)
    config = llama_config(ours)
    config.rope_parameters = {**HF_ROPE[name], "rope_theta": CFG.rope_base}
    hf = LlamaForCausalLM(config).eval()
    hf.load_state_dict(llama_state_dict(ours), strict=True)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    with torch.no_grad():
        for n in (L // 2, L, 4 * L):
            x = tokens(n)
            assert max_diff(ours(x), hf(x).logits) <= TOL


# ------------------------------------------------------------------ (b) our encoding in HF = transformers' own
@pytest.mark.parametrize("name,hf_rope", [
    ("pi", {"rope_type": "linear", "factor": 4.0}),
    ("dynamic_ntk", {"rope_type": "dynamic", "factor": 2.0}),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}),
])
def test_our_encoding_in_hf_equals_transformers_rope_type(name, hf_rope):
    """The same HF weights, once with transformers' rope_type and once with our encoding swapped in.
    Lengths increase (HF's dynamic NTK keeps the largest length's θ seen so far; ours uses the current length)."""
    torch.manual_seed(0)
    config = llama_config(decoder("rope"))
    config.rope_parameters = {**hf_rope, "rope_theta": CFG.rope_base}
    native = LlamaForCausalLM(config).eval()
    plain = LlamaForCausalLM(llama_config(decoder("rope"))).eval()
    plain.load_state_dict(native.state_dict())
    ours = HFDecoder(plain, SPECS[name], L).eval()
    with torch.no_grad():
        for n in (L // 2, L, 3 * L, 5 * L):
            x = tokens(n, seed=n)
            assert max_diff(ours(x), native(x).logits) <= TOL, n


# ------------------------------------------------------------------ the Decoder's contract: training, protocol, generation
@pytest.mark.parametrize("name", ["clex", "clex_discrete", "randompos", "yarn", "alibi", "sandwich"])
def test_training_forward_and_gradients_match_the_decoder(name):
    """Training positions and t (clex.lit.scale_and_positions, docs/method.md §3.4-3.5) reach HF through the
    adapter: same logits, same gradients of the encoding's weights and of the embedding."""
    ours = decoder(name).train()
    hf = from_decoder(ours, SPECS[name]).train()
    x, y = tokens(L + 1)[:, :-1], tokens(L + 1)[:, 1:]
    for step in (0, 1, 3, 5):  # t = 1, 2, 3, 4 for CLEX (t_max 4)
        t, positions = scale_and_positions(ours.rope, "random" if ours.rope.t_max else "none", L, seed=0, step=step)
        losses = []
        for model in (ours, hf):
            model.zero_grad()
            logits = model(x, positions=positions, t=t)
            loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
            loss.backward()
            losses.append((logits.detach(), loss.item()))
        assert max_diff(losses[0][0], losses[1][0]) <= TOL and math.isclose(losses[0][1], losses[1][1], rel_tol=1e-6)
        torch.testing.assert_close(hf.hf.model.embed_tokens.weight.grad, ours.embed.weight.grad, rtol=1e-4, atol=1e-7)
        for p, q in zip(hf.rope.parameters(), ours.rope.parameters()):
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-8)


def test_activation_checkpointing_keeps_the_encoding_gradients():
    """HF's activation checkpointing recomputes the layers, not the rotary call: the same CLEX gradients."""
    ours = decoder("clex").train()
    hf = from_decoder(ours, CLEX).train()
    hf.hf.activation_checkpointing_enable()
    x = tokens(L)
    for model in (ours, hf):
        F.cross_entropy(model(x, t=3).reshape(-1, V), x.reshape(-1)).backward()
    for p, q in zip(hf.rope.parameters(), ours.rope.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("name", ["clex", "dynamic_ntk", "alibi"])
def test_progressive_protocol_and_generation_match_the_decoder(name):
    """Chunks of L through the KV cache (un-rotated keys re-rotated when t changes, docs/method.md §3.6): the
    same logits and re-rotation count as our KVCache, and the same greedy continuation."""
    ours = decoder(name)
    hf = from_decoder(ours, SPECS[name]).eval()
    x = tokens(4 * L + 3)
    with torch.no_grad():
        caches = [ours.new_cache(), hf.new_cache()]
        a, b = (progressive_logits(m, x, cache=c) for m, c in zip((ours, hf), caches))
        assert max_diff(a, b) <= TOL
        assert caches[1].length == x.shape[1] and caches[0].rerotations == caches[1].rerotations
        if ours.rope.rotary:  # t = 1, 2, 3, 4, 4 (CLEX, t_max 4) or n/L (Dynamic NTK): not one long forward
            assert caches[1].rerotations == {"clex": 3, "dynamic_ntk": 4}[name] and max_diff(b, hf(x)) > 1e-3
    prompt = x[0, :L + 5]
    assert generate(ours, prompt, 2 * L) == generate(hf, prompt, 2 * L)


def test_param_groups_put_the_encoding_in_the_rope_group():
    hf = from_decoder(decoder("clex"), CLEX)
    groups = {g["name"]: g["params"] for g in LitDecoder(hf, OptimConfig(steps=1, batch_size=1, lr=1e-3), 0).param_groups()}
    assert {id(p) for p in groups["rope"]} == {id(p) for p in hf.rope.parameters()}
    assert hf.rope is hf.rotary.encoding and all(n.startswith(("rope.", "hf.")) for n, _ in hf.named_parameters())


# ------------------------------------------------------------------ (c) save, from_pretrained, our loader
def test_save_then_from_pretrained_and_our_loader(tmp_path):
    hf = from_decoder(decoder("clex"), CLEX).eval()
    x = tokens(3 * L)
    with torch.no_grad():
        before = hf(x)
    hf.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / ROPE_SPEC).read_text())
    assert meta["rope"]["type"] == "clex" and meta["train_len"] == L and (tmp_path / ROPE_WEIGHTS).exists()
    vanilla, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys: the adapter was not saved
    for k, v in vanilla.state_dict().items():
        assert torch.equal(v, hf.hf.state_dict()[k]), k
    loaded = load_hf_model(tmp_path).eval()
    assert loaded.spec == CLEX and loaded.cfg == hf.cfg
    for k, v in hf.rope.state_dict().items():
        assert torch.equal(loaded.rope.state_dict()[k], v)
    with torch.no_grad():
        assert torch.equal(loaded(x), before)


# ------------------------------------------------------------------ (d) bf16 body, fp32 encoding
def test_bf16_model_keeps_the_encoding_fp32(tmp_path):
    hf = from_decoder(decoder("clex"), CLEX)
    ref = from_decoder(decoder("clex"), CLEX).eval()
    hf.to(torch.bfloat16)
    assert hf.hf.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in hf.rope.parameters())
    assert hf.rope.base_inv_freq.dtype == torch.float32
    hf.half().bfloat16()  # any cast: still float32
    assert all(p.dtype == torch.float32 for p in hf.rope.parameters())
    with torch.no_grad():
        for t in range(1, CLEX.t_max + 1):
            assert torch.equal(hf.rope.eval().inv_freq(t), ref.rope.inv_freq(t))
    x = tokens(2 * L)
    hf.train()
    t, positions = scale_and_positions(hf.rope, "random", L, seed=0, step=1)
    assert t > 1
    logits = hf(x[:, :L], positions=positions, t=t)
    assert logits.dtype == torch.bfloat16
    F.cross_entropy(logits.float().reshape(-1, V), x[:, 1:L + 1].reshape(-1)).backward()
    grads = [p.grad for p in hf.rope.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    hf.eval()
    with torch.no_grad():
        assert max_diff(hf(x), ref(x)) < 0.1  # bf16 rounding of the body only
    hf.save_pretrained(tmp_path)
    loaded = load_hf_model(tmp_path, dtype=torch.bfloat16)
    assert loaded.hf.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in loaded.rope.parameters())
    assert all(torch.equal(p, q) for p, q in zip(loaded.rope.parameters(), hf.rope.parameters()))


# ------------------------------------------------------------------ other architectures, build_hf_model
ARCH = {
    "mistral": (MistralConfig, MistralForCausalLM),  # grouped-query attention (2 KV heads for 4 heads)
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),        # q/k/v biases
}


def save_random(tmp_path, arch: str):
    config_cls, model_cls = ARCH[arch]
    torch.manual_seed(0)
    config = config_cls(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=L, initializer_range=0.1, sliding_window=None)
    model = model_cls(config)
    model.save_pretrained(tmp_path)
    return model.eval()


@pytest.mark.parametrize("arch", list(ARCH))
def test_other_architectures_from_a_local_folder(tmp_path, arch):
    vanilla = save_random(tmp_path, arch)
    x = tokens(4 * L)
    experiment = Experiment(name="x", rope=RopeSpec(type="rope"))
    plain = build_hf_model(CFG, experiment, path=tmp_path).eval()
    pi = build_hf_model(CFG, Experiment(name="pi", rope=SPECS["pi"]), path=tmp_path).eval()
    clex = build_hf_model(CFG, Experiment(name="clex", rope=CLEX), path=tmp_path).eval()
    randomise(clex.rope, 0, scale=0.3)
    clex.rope.clear_cache()
    with torch.no_grad():
        assert max_diff(plain(x), vanilla(x).logits) <= TOL  # the adapter is HF's own plain RoPE
        assert max_diff(progressive_logits(pi, x), pi(x)) <= TOL  # constant t: chunks = one forward
        cache = clex.new_cache()
        out = progressive_logits(clex, x, cache=cache)
        assert torch.isfinite(out).all() and cache.rerotations == 3 and max_diff(out, clex(x)) > 1e-3


def test_refusals(tmp_path):
    save_random(tmp_path, "qwen2")
    exp = Experiment(name="x", rope=CLEX)
    with pytest.raises(ParamsError, match="model.path"):
        build_hf_model(CFG, exp)
    with pytest.raises(ParamsError, match="attn_log_scale"):
        build_hf_model(CFG, exp.model_copy(update={"attn_log_scale": True}), path=tmp_path)
    with pytest.raises(ParamsError, match="streaming"):
        build_hf_model(CFG, exp.model_copy(update={"streaming": StreamingSpec()}), path=tmp_path)
    for attention in (CausalAttention(log_scale_len=L), StreamingAttention(6, 2)):  # no HF counterpart
        with pytest.raises(ValueError, match=f"{type(attention).__name__}.*no Hugging Face counterpart"):
            from_decoder(Decoder(CFG, V, build_position_encoding(CLEX, head_dim=CFG.head_dim, base=CFG.rope_base,
                                                                 train_len=L), attention), CLEX)
    qwen3 = Qwen3Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=4, head_dim=16)
    with pytest.raises(ValueError, match="qwen3"):  # keys are normalised after k_proj: no un-rotated capture
        HFDecoder(Qwen3ForCausalLM(qwen3), CLEX, L)
    model = build_hf_model(CFG, exp, path=tmp_path, attn_implementation="eager").eval()
    with pytest.raises(RuntimeError, match="HFDecoder.forward"), torch.no_grad():
        model.hf(tokens(4), past_key_values=model.new_cache(), use_cache=True)
    flash = to_llama(decoder("rope"))
    flash.config._attn_implementation = "flash_attention_2"  # (not installed here: only the config is read)
    with pytest.raises(ValueError, match="attn_implementation"):  # a float bias mask needs sdpa or eager
        HFDecoder(flash, SPECS["alibi"], L)
