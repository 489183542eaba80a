"""Hugging Face model source: a LLaMA-family causal LM from `transformers` with our position encodings.

The checkpoint's modeling file is used as it is. Only its rotary module (`model.model.rotary_emb`) is swapped for a
`RotaryAdapter` with the same forward contract. In transformers 5.23, `LlamaModel.forward` (Mistral and Qwen2 do the
same) calls `self.rotary_emb(hidden_states, position_ids)` once per forward, before the layers. It hands the
resulting `(cos, sin)`, each (B, T, head_dim) in the hidden states' dtype, to every attention, which computes
`q·cos + rotate_half(q)·sin` (and the same for k) before its KV-cache update. That is our layout (docs/method.md §1).
So any encoding of `clex.rope` can answer that call:
- rotary encodings (plain RoPE, PI, NTK, Dynamic NTK, YaRN, base change, RandomPos, CLEX continuous and discrete)
  return `encoding(positions, t)` (float32 math, cast to the activations' dtype as HF casts its own tables);
- bias encodings (ALiBi, Sandwich) return the identity rotation (cos 1, sin 0). Their bias and the causal mask go
  in as one additive 4D float `attention_mask`, which HF's mask builder passes through unchanged. That works with
  the `sdpa` and `eager` attention implementations, not with flash-attention (which takes no float mask).

t and positions follow our `Decoder` (clex/model.py). At inference t = `encoding.inference_t(n)`, n being the context
length: ceil(n/L) capped at t_max for CLEX, n/L for Dynamic NTK (docs/method.md §3.6). In training the caller passes
t and the positions of `clex.lit.scale_and_positions` (docs/method.md §3.4-3.5). Training positions never go in as
HF `position_ids`: HF would read a jump in them as a packed-sequence boundary and mask across it. They reach the
adapter directly (`HFDecoder.forward(positions=..., t=...)`), and the HF model sees plain position ids.

Precision: the encoding (CLEX's network, θ tables) stays float32 when the model is cast to bf16
(`HFDecoder._apply`, `RotaryAdapter._apply` move it to the new device only). Its math already runs in float32 with
autocast off (clex/rope/base.py).

The progressive protocol (clex/evaluate.py, docs/protocols.md) needs a KV cache that keeps the keys un-rotated and
re-rotates all of them when t changes (docs/method.md §3.6). `RerotatingCache` is an HF `Cache` that does this.
HF hands the cache already-rotated keys, so a forward hook on each layer's `self_attn.k_proj` captures the
un-rotated keys during `HFDecoder.forward`. For new keys at an unchanged t, the cache keeps the keys HF rotated
itself; when t changed, it rotates every stored un-rotated key with θ(t) at its own position.

Saving (`HFDecoder.save_pretrained`) writes the HF checkpoint without the adapter's tensors, so a plain
`AutoModelForCausalLM.from_pretrained` loads the fine-tuned weights with the checkpoint's own RoPE. It also writes
`clex_rope.json` (the encoding's spec, L, head dim, base) and `clex_rope.pt` (its state, float32) beside it.
`load_hf_model` restores both. `from_decoder` maps our `Decoder`'s weights into a `LlamaForCausalLM` of the same
shape (the parity tests' bridge, and a way to export a base model trained here).

Tested architectures: `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` (`ARCHITECTURES`). Others are
refused; e.g. Qwen3 normalises keys after `k_proj`, so the captured keys would not be the un-rotated ones.
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import TypeAdapter
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

import clex.attention
from clex.config import HF_ARCHITECTURES, Experiment, ParamsError, PositionSpec, hf_refusal
from clex.attention import CausalAttention, causal_mask
from clex.model import Decoder, Rows, _Fp32Child, compute_dtype
from clex.rope import PositionEncoding, apply_rotary, build_position_encoding

ARCHITECTURES = HF_ARCHITECTURES  # config.model_type values whose rotary and k_proj contract is tested
ROPE_SPEC, ROPE_WEIGHTS = "clex_rope.json", "clex_rope.pt"
FORMAT = 1
FLOAT_MASK_ATTENTION = ("sdpa", "eager")  # implementations that take an additive float mask (bias encodings)


@dataclass(frozen=True)
class HFShape:
    """What the stages read from `model.cfg` (the Decoder's ModelConfig has the same names), from the HF config.
    `train_len` is L, the context the checkpoint was trained at: the study's `model.train_len`."""

    train_len: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    rope_base: float
    vocab_size: int


def hf_shape(config, train_len: int) -> HFShape:
    """The shape of an HF causal LM config; the RoPE base is `rope_parameters['rope_theta']` (transformers 5)."""
    c = config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = c.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        warnings.warn(f"the checkpoint's RoPE is {rope.get('rope_type')!r}; it is replaced by our encoding, built on "
                      f"the plain base rope_theta={rope['rope_theta']}", stacklevel=3)
    return HFShape(train_len, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads,
                   head_dim, c.hidden_size, float(rope["rope_theta"]), c.vocab_size)


class RotaryAdapter(_Fp32Child):
    """Drop-in for an HF rotary module: `forward(x, position_ids) -> (cos, sin)`, each (B, T, head_dim) in x.dtype.

    Per-forward state set by `HFDecoder.forward` (`step`): `t` (None: the inference rule at the last position + 1)
    and `positions` (None: `position_ids`; training positions may be fractional, docs/method.md §3.5), and the
    `cache` whose un-rotated keys the k_proj hooks capture. Unlike HF's module it is differentiable: CLEX learns
    through cos/sin. A bias encoding gets the identity rotation (its bias is the attention mask).
    """

    def __init__(self, encoding: PositionEncoding):
        super().__init__()
        self.encoding = encoding
        self.t: float | None = None
        self.positions: Tensor | None = None
        self.cache: RerotatingCache | None = None

    @property
    def _fp32(self) -> PositionEncoding:
        return self.encoding

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        enc = self.encoding
        t = self.t if self.t is not None else enc.inference_t(int(position_ids.max()) + 1)
        positions = position_ids if self.positions is None else self.positions
        if self.cache is not None:
            self.cache.begin_forward(enc, t, x.dtype)
        if not enc.rotary:
            shape = (*positions.shape, enc.head_dim)
            return torch.ones(shape, dtype=x.dtype, device=x.device), torch.zeros(shape, dtype=x.dtype, device=x.device)
        cos, sin = enc(positions.to(x.device), t)
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        return cos.to(x.dtype), sin.to(x.dtype)

    @contextmanager
    def step(self, t: float | None, positions: Tensor | None, cache: RerotatingCache | None):
        self.t, self.positions, self.cache = t, positions, cache
        try:
            yield
        finally:
            self.t = self.positions = self.cache = None


class RerotatingLayer(DynamicLayer):
    """One layer of `RerotatingCache`: `keys` holds the keys rotated with the cache's current (t, θ(t)), `raw` the
    un-rotated ones (as `k_proj` computed them), `values` the values; each is a view of rows (`clex.model.Rows`)
    allocated for the cache's capacity and written in place. `rotated_with` is the (t, θ(t)) of `keys`."""

    def __init__(self, cache: RerotatingCache, index: int):
        super().__init__()
        self.cache, self.index = cache, index
        self.rows = {name: Rows(cache.capacity) for name in ("raw", "keys", "values")}
        self.rotated_with: tuple[float, Tensor] | None = None

    @property
    def raw(self) -> Tensor | None:
        return self.rows["raw"].view()

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        raw = self.cache.take_raw(self.index, key_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.rows["raw"].length
        raw = self.rows["raw"].write(raw, start)
        self.values = self.rows["values"].write(value_states, start)
        current = self.cache.current
        last = self.rotated_with
        if last is not None and last[0] == current[0] and (last[1] is current[1] or torch.equal(last[1], current[1])):
            self.keys = self.rows["keys"].write(key_states, start)  # rotated by HF with the same θ(t)
        else:  # every key rotated anew, ROTATE_BLOCK rows at a time straight into place
            n = raw.shape[-2]
            cos, sin = self.cache.tables(n)
            self.keys = self.rows["keys"].fill(0, n, key_states, lambda a, b: apply_rotary(
                raw[..., a:b, :], cos[..., a:b, :], sin[..., a:b, :]), clex.attention.ROTATE_BLOCK)
            self.rotated_with = current
            if self.index == 0 and start:
                self.cache.rerotations += 1
        return self.keys, self.values

    def reset(self) -> None:
        self.rows = {name: Rows(self.cache.capacity) for name in self.rows}
        self.rotated_with = None
        super().reset()

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("RerotatingCache supports appending only (no crop, beam search or batch reordering)")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported


class RerotatingCache(Cache):
    """An HF KV cache that keeps keys un-rotated and re-rotates them when t (or θ(t)) changes, like
    `clex.model.KVCache` (docs/method.md §3.6): what the progressive protocol and `clex generate` need.

    Feed it through `HFDecoder.forward(tokens, cache=cache)`, which turns on the capture of the un-rotated keys.
    `length` (tokens so far), `rerotations` (forwards that re-rotated the cached keys) and `capacity` (tokens
    allocated per layer at the first forward, written in place; 0: grown as needed) as in KVCache.
    """

    def __init__(self, n_layers: int, capacity: int = 0):
        self.capacity = capacity
        super().__init__(layers=[RerotatingLayer(self, i) for i in range(n_layers)])
        self.pending: dict[int, Tensor] = {}
        self.rerotations = 0
        self.current: tuple[float, Tensor] | None = None
        self._encoding: PositionEncoding | None = None
        self._dtype: torch.dtype | None = None
        self._tables: tuple[Tensor, Tensor] | None = None

    @property
    def length(self) -> int:
        return self.get_seq_length()

    def begin_forward(self, encoding: PositionEncoding, t: float, dtype: torch.dtype) -> None:
        """Called by the adapter once per forward: this forward's (t, θ(t)) and the dtype of its cos/sin."""
        self._encoding, self._dtype, self._tables = encoding, dtype, None
        self.current = (t, encoding.inv_freq(t))

    def tables(self, n: int) -> tuple[Tensor, Tensor]:
        """cos/sin of positions 0..n-1 at this forward's t, in the dtype the adapter gave HF (computed once)."""
        if self._tables is None or self._tables[0].shape[-2] != n:
            enc, t = self._encoding, self.current[0]
            if enc.rotary:
                cos, sin = enc(torch.arange(n, dtype=torch.float32, device=enc.base_inv_freq.device), t)
            else:
                cos = torch.ones(n, enc.head_dim, device=enc.base_inv_freq.device)
                sin = torch.zeros_like(cos)
            self._tables = (cos.to(self._dtype), sin.to(self._dtype))
        return self._tables

    def take_raw(self, index: int, key_states: Tensor) -> Tensor:
        """The un-rotated keys `k_proj` produced for this forward in layer `index`, shaped like `key_states`."""
        if index not in self.pending:
            raise RuntimeError("RerotatingCache: the un-rotated keys were not captured; feed the cache through "
                               "HFDecoder.forward(tokens, cache=cache), not through the HF model directly")
        flat = self.pending.pop(index)  # (B, T, kv_heads * head_dim)
        B, H, T, D = key_states.shape
        return flat.view(B, T, H, D).transpose(1, 2)


def _capture_keys(adapter: RotaryAdapter, index: int):
    def hook(module, args, output):
        if adapter.cache is not None:
            adapter.cache.pending[index] = output

    return hook


class HFDecoder(_Fp32Child):
    """An HF causal LM with one of our position encodings, with our `Decoder`'s interface (clex/model.py):
    `forward(tokens, positions=None, t=None, cache=None) -> logits`, `context_t(n)`, `new_cache()`, `cfg.train_len`,
    and `rope` (the encoding; registered first, so its parameters are named `rope.*` as LitDecoder's groups expect).

    `spec` is the encoding's validated spec (clex.config.PositionSpec), saved beside the weights.
    """

    def __init__(self, hf: PreTrainedModel, spec, train_len: int):
        super().__init__()
        model_type = hf.config.get_text_config().model_type
        if model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {model_type!r} ({type(hf).__name__}) is not supported; allowed: "
                             f"{list(ARCHITECTURES)} (a rotary_emb(x, position_ids) module and keys = k_proj output)")
        base = hf.base_model
        if not isinstance(getattr(base, "rotary_emb", None), nn.Module):
            raise ValueError(f"{type(hf).__name__}: its base model has no `rotary_emb` module to replace")
        self.cfg = hf_shape(hf.config, train_len)
        rope = build_position_encoding(spec, head_dim=self.cfg.head_dim, base=self.cfg.rope_base, train_len=train_len)
        device = hf.get_input_embeddings().weight.device
        self.spec, self.vocab_size = spec, self.cfg.vocab_size
        self.rope = rope.to(device)  # first: parameters named rope.*
        adapter = base.rotary_emb = RotaryAdapter(self.rope)
        self.hf = hf
        self.rotary_prefix = next(name for name, m in hf.named_modules() if m is adapter) + "."
        for i, layer in enumerate(base.layers):
            layer.self_attn.k_proj.register_forward_hook(_capture_keys(adapter, i))
        if not self.rope.rotary and hf.config._attn_implementation not in FLOAT_MASK_ATTENTION:
            raise ValueError(f"{type(self.rope).__name__} adds a bias through a float attention mask; allowed "
                             f"attn_implementation: {list(FLOAT_MASK_ATTENTION)}, not {hf.config._attn_implementation!r}")

    @property
    def _fp32(self) -> PositionEncoding:
        return self.rope

    @property
    def rotary(self) -> RotaryAdapter:
        """The adapter in the HF model's place of `rotary_emb`."""
        return self.hf.base_model.rotary_emb

    def context_t(self, n: int) -> float:
        """The inference t for a context of n tokens (docs/method.md §3.6)."""
        return self.rope.inference_t(n)

    def new_cache(self, capacity: int = 0) -> RerotatingCache:
        """A RerotatingCache sized for `capacity` tokens (0: it grows as needed)."""
        return RerotatingCache(self.cfg.n_layers, capacity)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, t: float | None = None,
                cache: RerotatingCache | None = None) -> Tensor:
        """Logits (B, T, V) for (B, T) tokens; the same contract as `Decoder.forward`.

        positions/t default to 0..n-1 and `context_t(n)` (n = T, or cached + T with a cache). Training passes
        the (t, positions) of `clex.lit.scale_and_positions`. With `cache` (a `new_cache()`), the tokens follow the
        cached ones and positions must be None.
        """
        T = tokens.shape[1]
        offset = 0
        if cache is not None:
            if positions is not None:
                raise ValueError("positions: a cached forward uses positions 0..n-1; allowed: None")
            if not isinstance(cache, RerotatingCache):
                raise TypeError(f"cache: {type(cache).__name__}; allowed: HFDecoder.new_cache()")
            offset = cache.length
        n = offset + T
        if t is None:
            t = self.context_t(n)
        mask = None
        if not self.rope.rotary:  # ALiBi / Sandwich: bias + causal mask as one additive 4D float mask
            k_pos = positions if positions is not None else torch.arange(n, device=tokens.device, dtype=torch.float32)
            bias = self.rope.attention_bias(self.cfg.n_heads, k_pos[..., offset:], k_pos)
            mask = causal_mask(bias, compute_dtype(self.hf.get_input_embeddings().weight))
            mask = mask if mask.dim() == 4 else mask[None]
        with self.rotary.step(t, positions, cache):
            out = self.hf(input_ids=tokens, attention_mask=mask, past_key_values=cache, use_cache=cache is not None)
        return out.logits

    def save_pretrained(self, path: str | Path, state: dict[str, Tensor] | None = None) -> Path:
        """The HF checkpoint (without the adapter's tensors: a plain `from_pretrained` loads it with the checkpoint's
        own RoPE) plus `clex_rope.json` (spec, L, head dim, base) and `clex_rope.pt` (the encoding's state, float32).
        `state`: this model's full state dict (its own keys, `hf.*` and `rope.*`) when the module holds only a shard
        of it (FSDP: clex.distributed.model_state_dict gathers it); default `self.state_dict()`."""
        path = Path(path)
        state = self.state_dict() if state is None else state
        body = {k.removeprefix("hf."): v for k, v in state.items()
                if k.startswith("hf.") and not k.removeprefix("hf.").startswith(self.rotary_prefix)}
        self.hf.save_pretrained(path, state_dict=body)
        rope = {k.removeprefix("rope."): v.detach().cpu() for k, v in state.items() if k.startswith("rope.")}
        torch.save(rope, path / ROPE_WEIGHTS)
        meta = {"format": FORMAT, "rope": self.spec.model_dump(mode="json"), "train_len": self.cfg.train_len,
                "head_dim": self.cfg.head_dim, "rope_base": self.cfg.rope_base, "architecture": type(self.hf).__name__}
        (path / ROPE_SPEC).write_text(json.dumps(meta, indent=1))
        return path


# ---------------------------------------------------------------------------- building and loading
def checkpoint_dir(model_cfg, root: Path | str = ".") -> Path:
    """The local folder of the study's checkpoint (`model.path`): a local folder (relative to the study root), or
    for a hub id its snapshot in the Hugging Face cache (downloaded on first use; cached after, also offline)."""
    local = model_cfg.local_path(root)
    if local is not None:
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_cfg.path))


def _from_pretrained(path: str | Path, dtype: torch.dtype | None, attn_implementation: str) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32,
                                                attn_implementation=attn_implementation)


def build_hf_model(params, experiment: Experiment, *, path: str | Path | None = None, dtype: torch.dtype | None = None,
                   attn_implementation: str = "sdpa") -> HFDecoder:
    """An HFDecoder for `experiment` from the checkpoint at `path` (default `params.model.path`): a local folder
    or a hub id. L = `params.model.train_len` (set it to the checkpoint's pre-training context, e.g. 4096 for
    LLaMA-2); head dim and base come from the checkpoint's config. `params` is the study's Params (or its
    ModelConfig). The encoding is freshly built (CLEX: W_down = 0, so it starts at its prior, docs/method.md §3.3).
    dtype: of the body (default float32); the encoding stays float32."""
    model_cfg = getattr(params, "model", params)
    path = path or getattr(model_cfg, "path", None)
    if not path:
        raise ParamsError("model.path: required for a Hugging Face model (a local checkpoint folder or a hub id)")
    why = hf_refusal(experiment, attn_implementation)
    if why:
        raise ParamsError(f"experiments/{experiment.name}.yaml: {why}")
    return HFDecoder(_from_pretrained(path, dtype, attn_implementation), experiment.rope, model_cfg.train_len)


def load_hf_model(path: str | Path, *, dtype: torch.dtype | None = None, attn_implementation: str = "sdpa") -> HFDecoder:
    """An HFDecoder saved by `HFDecoder.save_pretrained`: the HF weights, and the encoding rebuilt from
    clex_rope.json with its state from clex_rope.pt (float32, whatever `dtype` the body gets)."""
    path = Path(path)
    meta = json.loads((path / ROPE_SPEC).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / ROPE_SPEC}: format {meta.get('format')!r}; allowed: {FORMAT}")
    spec = TypeAdapter(PositionSpec).validate_python(meta["rope"], strict=False)
    model = HFDecoder(_from_pretrained(path, dtype, attn_implementation), spec, meta["train_len"])
    model.rope.load_state_dict(torch.load(path / ROPE_WEIGHTS, map_location="cpu", weights_only=True))
    return model


# ---------------------------------------------------------------------------- our Decoder as a LlamaForCausalLM
def llama_config(decoder: Decoder, attn_implementation: str = "sdpa") -> LlamaConfig:
    """The LlamaConfig of our Decoder's architecture (clex/model.py), which is LLaMA's without GQA or biases:
    RMSNorm (eps 1e-6, float32 inside), SwiGLU MLP, no biases, tied input/output embeddings, one KV head per head.
    No padding index (ours has none: HF's would zero that row's gradient). Plain RoPE at the Decoder's base."""
    c = decoder.cfg
    return LlamaConfig(
        vocab_size=decoder.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads, head_dim=c.head_dim,
        max_position_embeddings=c.train_len, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
        mlp_bias=False, tie_word_embeddings=True, pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_base}, attn_implementation=attn_implementation)


def llama_state_dict(decoder: Decoder) -> dict[str, Tensor]:
    """Our Decoder's weights under LlamaForCausalLM's names: the fused qkv rows [q; k; v] and gate_up rows
    [gate; up] are split (the Decoder's own chunking), everything else is renamed. lm_head is tied to the embedding."""
    s, d, ff = decoder.state_dict(), decoder.cfg.d_model, decoder.cfg.d_ff
    out = {"model.embed_tokens.weight": s["embed.weight"], "lm_head.weight": s["embed.weight"],
           "model.norm.weight": s["norm.weight"]}
    for i in range(decoder.cfg.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = s[b + "attn.qkv.weight"].split(d)
        gate, up = s[b + "mlp.gate_up.weight"].split(ff)
        out.update({
            h + "input_layernorm.weight": s[b + "attn_norm.weight"],
            h + "post_attention_layernorm.weight": s[b + "mlp_norm.weight"],
            h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k, h + "self_attn.v_proj.weight": v,
            h + "self_attn.o_proj.weight": s[b + "attn.proj.weight"],
            h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up, h + "mlp.down_proj.weight": s[b + "mlp.down.weight"],
        })
    return out


def to_llama(decoder: Decoder, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A plain LlamaForCausalLM (its own plain RoPE) with our Decoder's weights, float32 on the CPU."""
    hf = LlamaForCausalLM(llama_config(decoder, attn_implementation))
    hf.load_state_dict({k: v.detach().cpu().float() for k, v in llama_state_dict(decoder).items()}, strict=True)
    return hf.eval()


def from_decoder(decoder: Decoder, spec, attn_implementation: str = "sdpa") -> HFDecoder:
    """An HFDecoder equal to our Decoder: its weights in a LlamaForCausalLM and an encoding for `spec` holding the
    Decoder's encoding state (e.g. trained CLEX weights). Only plain causal attention has an HF counterpart (no
    attention log scale, no streaming window)."""
    if decoder.attention != CausalAttention():
        raise ValueError(f"from_decoder: {decoder.attention!r} has no Hugging Face counterpart; allowed: "
                         f"{CausalAttention()!r}")
    model = HFDecoder(to_llama(decoder, attn_implementation), spec, decoder.cfg.train_len)
    model.rope.load_state_dict(decoder.rope.state_dict())
    return model


__all__ = ["ARCHITECTURES", "HFDecoder", "HFShape", "RerotatingCache", "RotaryAdapter", "build_hf_model",
           "from_decoder", "llama_config", "llama_state_dict", "load_hf_model", "to_llama"]
