"""One decoder-only transformer for two families: GPT-2 and LLaMA-style models.

GPT-2 (gpt2, -medium, -large, -xl) and LLaMA-style models (Llama 2/3 incl. "llama3"
RoPE scaling, Mistral, TinyLlama, SmolLM2) differ only in a handful of choices, so one
`Transformer` covers both and a `ModelConfig.family` picks between them:

                    gpt2                         llama
    norm            LayerNorm (with bias)        RMSNorm
    positions       learned table (pos_emb)      RoPE, HF rotate-half layout
    MLP             c_fc -> gelu(tanh) -> c_proj gate_proj, up_proj -> SwiGLU -> down_proj
    heads           n_kv_head == n_head          grouped-query attention (n_kv_head <= n_head)

Attention projections are separate nn.Linear layers named q_proj, k_proj, v_proj, o_proj in
both families (GPT-2's fused Conv1D c_attn is split at load time), so KaSA adapters target the
same names everywhere.

Reading order: config -> norm/RoPE -> attention + KV cache -> MLP -> block -> model ->
loading (HF dirs, hub ids, GGUF) -> tokenizer.

Interface used by the rest of the project:

    model, tokenizer = load_pretrained("path/or/hub-id/or/file.gguf", dtype=torch.bfloat16)
    logits, loss = model(input_ids, targets)       # targets already shifted by the caller
    h = model.hidden_states(input_ids, attention_mask)               # (B, T, d), final-normed
    cache = model.new_cache(batch_size, max_len)   # then model(new_ids, attention_mask=..., cache=cache)
    out = model.generate(input_ids, max_new_tokens, eos_token_id, attention_mask)
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config

SUPPORTED_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama"}


@dataclass
class ModelConfig:
    family: str = "llama"  # "gpt2" | "llama"
    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None -> n_head (plain multi-head attention)
    d_model: int = 768
    d_ff: int | None = None  # None -> 4 * d_model
    head_dim: int | None = None  # None -> d_model // n_head (Mistral/Llama may set it explicitly)
    max_position: int = 2048
    norm_eps: float = 1e-5
    activation: str = "silu"  # "silu" (SwiGLU) | "gelu_tanh" | "gelu"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    sliding_window: int | None = None  # Mistral v0.1 local attention span
    tie_embeddings: bool = False
    attn_bias: bool = False  # bias on q/k/v/o projections
    mlp_bias: bool = False
    dropout: float = 0.0  # residual, embedding and attention dropout (training only)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in ("gpt2", "llama"):
            raise ValueError(f"family must be 'gpt2' or 'llama', got {self.family!r}")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.d_ff = self.d_ff or 4 * self.d_model
        self.head_dim = self.head_dim or self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Map a Hugging Face config.json dict onto ModelConfig."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r}, architectures={hf.get('architectures')}. "
                f"Supported model_type values: {sorted(SUPPORTED_MODEL_TYPES)} "
                "(GPT-2; Llama 2/3, TinyLlama and SmolLM2 are 'llama'; Mistral is 'mistral').")
        tokens = dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                      pad_token_id=hf.get("pad_token_id"))
        if model_type == "gpt2":
            if hf.get("scale_attn_by_inverse_layer_idx"):
                raise ValueError("GPT-2 with scale_attn_by_inverse_layer_idx=True is not supported")
            act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
            if hf.get("activation_function", "gelu_new") not in act:
                raise ValueError(f"unsupported GPT-2 activation_function {hf['activation_function']!r}; "
                                 f"supported: {sorted(act)}")
            return cls(family="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                       d_model=hf["n_embd"], d_ff=hf.get("n_inner"), max_position=hf["n_positions"],
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       activation=act[hf.get("activation_function", "gelu_new")],
                       tie_embeddings=hf.get("tie_word_embeddings", True), attn_bias=True, mlp_bias=True, **tokens)
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} for {model_type}; only 'silu' (SwiGLU)")
        # transformers >= 5 writes "rope_parameters" (theta included); older configs use
        # top-level "rope_theta" plus "rope_scaling" (with "type" or "rope_type").
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported RoPE scaling type {rope_type!r}; supported: default, linear, llama3")
        rope = {**rope, "rope_type": rope_type} if rope_type != "default" else None
        return cls(family="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                   n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads"),
                   d_model=hf["hidden_size"], d_ff=hf["intermediate_size"], head_dim=hf.get("head_dim"),
                   max_position=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
                   rope_theta=theta, rope_scaling=rope, sliding_window=hf.get("sliding_window"),
                   tie_embeddings=hf.get("tie_word_embeddings", False), attn_bias=hf.get("attention_bias", False),
                   mlp_bias=hf.get("mlp_bias", False), **tokens)


# ----------------------------------------------------------------------------- norm and RoPE

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32, round back, then scale: the same rounding order as HF's LlamaRMSNorm.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), fp32 on CPU, with optional linear or Llama-3.1 scaling."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device="cpu") / cfg.head_dim)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(is_medium, blended, scaled)
    return inv_freq


def rope_cos_sin(inv_freq, position_ids, dtype):
    """cos/sin of shape (B, 1, T, head_dim) for absolute positions (B, T); angles in fp32."""
    angles = position_ids[:, :, None].float() * inv_freq.to(position_ids.device)[None, None, :]
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # HF layout: first half and second half share freqs
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # rotate_half(x) = [-x2, x1]


# ----------------------------------------------------------------------------- attention and KV cache

class KVCache:
    """Preallocated keys/values for incremental decoding.

    k[layer], v[layer]: (batch, n_kv_head, max_len, head_dim); `length` positions are filled.
    Every layer writes its new keys/values at [length, length + T) and the model advances
    `length` by T after the last layer, so one forward call appends T positions.

    The caller owns the attention mask: pass attention_mask of shape (B, length + T) with 1 for
    real tokens and 0 for padding (left padding is the usual choice for batched prompts).

    Beam search: `expand(n)` repeats every row n times (row b -> rows b*n .. b*n+n-1, like
    repeat_interleave), and `reorder(index)` keeps rows `index` (index_select along batch),
    e.g. the parent beam of every surviving hypothesis. Reorder the attention mask the same way.
    """

    def __init__(self, n_layer, batch_size, n_kv_head, head_dim, max_len, dtype, device):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k, v):
        """Store new k/v (B, n_kv_head, T, head_dim) for `layer`; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}; "
                             "create the cache with a larger max_len")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> "KVCache":
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        return self

    def expand(self, n: int) -> "KVCache":
        self.k = [k.repeat_interleave(n, dim=0) for k in self.k]
        self.v = [v.repeat_interleave(n, dim=0) for v in self.v]
        return self


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_head, self.n_kv_head, self.head_dim = layer_idx, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.attn_bias)

    def forward(self, x, rope, mask, is_causal, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


# ----------------------------------------------------------------------------- MLP and block

class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


def make_norm(cfg: ModelConfig):
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.family == "gpt2" else RMSNorm(cfg.d_model, cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg, layer_idx)
        self.norm2, self.mlp = make_norm(cfg), (GeluMLP(cfg) if cfg.family == "gpt2" else SwiGLU(cfg))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, is_causal, cache):
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, is_causal, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------- model

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_position, cfg.d_model) if cfg.family == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        # A plain fp32 CPU tensor, not a buffer: model.to(bfloat16) must not round the frequencies,
        # and building on the meta device must still give real values.
        self.inv_freq = rope_inv_freq(cfg) if cfg.family == "llama" else None

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts tied weights once

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        ref = self.tok_emb.weight
        cfg = self.config
        return KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, cfg.head_dim, max_len,
                       dtype or ref.dtype, device or ref.device)

    def _attention_mask(self, attention_mask, T, past, device):
        """Boolean (B or 1, 1, T, past+T) mask of allowed keys, or None when SDPA's is_causal suffices."""
        S = past + T
        window = self.config.sliding_window
        windowed = window is not None and S > window
        if attention_mask is None and (past == 0 or T == 1) and not windowed:
            return None
        if attention_mask is not None and attention_mask.shape[-1] != S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected "
                             f"cached + new = {past} + {T} = {S}")
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        allowed = k_pos <= q_pos
        if windowed:
            allowed = allowed & (k_pos > q_pos - window)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
        # A query on a padding position may see no key at all; letting it see itself keeps the
        # softmax finite (its output is never used).
        return allowed | (k_pos == q_pos)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        """Final-normed hidden states (B, T, d_model) for the new tokens `input_ids` (B, T).

        attention_mask: (B, cached + T) of 1 = token, 0 = padding. position_ids: (B, T); if None they
        are cumsum(attention_mask) - 1 (so left padding does not shift positions), or simply
        cached .. cached + T - 1 without a mask.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        mask = self._attention_mask(attention_mask, T, past, input_ids.device)
        is_causal = mask is None and past == 0 and T > 1
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        x = self.drop(x)
        rope = rope_cos_sin(self.inv_freq, position_ids, x.dtype) if self.inv_freq is not None else None
        for block in self.blocks:
            x = block(x, rope, mask, is_causal, cache)
        if cache is not None:
            cache.length += T
        return self.norm_f(x)

    def forward(self, input_ids, targets=None, attention_mask=None, position_ids=None, cache=None,
                ignore_index: int = -100, label_smoothing: float = 0.0):
        """Returns (logits (B, T, vocab), loss or None).

        `targets` (B, T) must already be aligned with the logits: targets[:, t] is the token that
        logits[:, t] should predict (for language modelling the caller passes input_ids shifted
        left by one, with ignore_index where there is nothing to predict). The loss is the mean
        cross-entropy over all non-ignored positions, computed in fp32.
        """
        logits = self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                                   label_smoothing=label_smoothing)
        return logits, loss

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, eos_token_id=None, attention_mask=None):
        """Greedy decoding with a KV cache. Batched prompts must be LEFT-padded (with attention_mask).

        Returns (B, T + n) ids, n <= max_new_tokens; a row that emitted eos_token_id (int or list)
        is padded with that eos id until every row is done.
        """
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        eos = None if eos_token_id is None else torch.tensor(eos_token_id, device=input_ids.device).flatten()
        cache = self.new_cache(B, T + max_new_tokens)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        out, step = input_ids, input_ids
        for _ in range(max_new_tokens):
            h = self.hidden_states(step, attention_mask=mask, cache=cache)
            token = self.lm_head(h[:, -1]).argmax(-1)  # only the last position's logits are needed
            if eos is not None:
                token = torch.where(done, eos[0], token)
                done |= torch.isin(token, eos)
            out, step = torch.cat([out, token[:, None]], 1), token[:, None]
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            if done.all():
                break
        return out


# ----------------------------------------------------------------------------- checkpoint readers
# Every reader returns {hf_name: (shape, load)} where load() materialises that one tensor, so
# names and shapes are validated before any weight is read, and weights are read one at a time.

class CheckpointError(ValueError):
    pass


def _read_safetensors(path: Path):
    from safetensors import safe_open
    try:
        handle = safe_open(str(path), framework="pt")
        return {name: (tuple(handle.get_slice(name).get_shape()), lambda n=name: handle.get_tensor(n))
                for name in handle.keys()}
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e} (corrupt or truncated safetensors file? re-download it)") from e


def _read_torch_bin(path: Path):
    try:  # weights_only: never execute pickled code; mmap: no second copy in memory
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e} (corrupt or truncated pytorch_model.bin? re-download it)") from e
    return {name: (tuple(t.shape), lambda t=t: t) for name, t in sd.items()}


def _read_hf_dir(d: Path):
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index_name).exists():
            files = sorted(set(json.loads((d / index_name).read_text())["weight_map"].values()))
            break
    else:
        files = [f for f in ("model.safetensors", "pytorch_model.bin") if (d / f).exists()][:1]
    if not files:
        raise FileNotFoundError(f"no weights in {d}: expected model.safetensors, model.safetensors.index.json "
                                "or pytorch_model.bin")
    tensors = {}
    for f in files:
        if not (d / f).exists():
            raise FileNotFoundError(f"shard {f} listed in the index is missing from {d}")
        tensors.update((_read_safetensors if f.endswith(".safetensors") else _read_torch_bin)(d / f))
    return tensors


# ----------------------------------------------------------------------------- HF names -> our names

_LLAMA_RENAMES = [
    (r"^model\.embed_tokens\.", "tok_emb."),
    (r"^model\.norm\.", "norm_f."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"blocks.\1.norm1."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.norm2."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"blocks.\1.attn."),
    (r"^model\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
]
_GPT2_RENAMES = [
    (r"^(transformer\.)?wte\.", "tok_emb."),
    (r"^(transformer\.)?wpe\.", "pos_emb."),
    (r"^(transformer\.)?ln_f\.", "norm_f."),
    (r"^(transformer\.)?h\.(\d+)\.ln_1\.", r"blocks.\2.norm1."),
    (r"^(transformer\.)?h\.(\d+)\.ln_2\.", r"blocks.\2.norm2."),
    (r"^(transformer\.)?h\.(\d+)\.attn\.c_proj\.", r"blocks.\2.attn.o_proj."),
    (r"^(transformer\.)?h\.(\d+)\.attn\.c_attn\.", r"blocks.\2.attn.c_attn."),
    (r"^(transformer\.)?h\.(\d+)\.mlp\.", r"blocks.\2.mlp."),
]
# Constant buffers that some checkpoints carry; they are recomputed, not loaded.
_IGNORED = re.compile(r"(\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$)")


def _convert(cfg: ModelConfig, hf_name: str, tensor):
    """Yield (our_name, tensor) for one checkpoint tensor. Works on meta tensors too (dry run)."""
    name = hf_name
    for pattern, repl in (_GPT2_RENAMES if cfg.family == "gpt2" else _LLAMA_RENAMES):
        name = re.sub(pattern, repl, name)
    if cfg.family == "gpt2" and name.endswith(".weight") and re.search(r"\.(c_attn|o_proj|c_fc|c_proj)\.", name):
        tensor = tensor.t()  # HF GPT-2 uses Conv1D (in, out); nn.Linear wants (out, in)
    if ".c_attn." in name:  # fused q|k|v along the output dim -> three Linear layers
        d = cfg.n_head * cfg.head_dim
        assert tensor.shape[0] == 3 * d, f"{hf_name}: expected {3 * d} fused q/k/v rows, got {tuple(tensor.shape)}"
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split(d, dim=0)):
            yield name.replace("c_attn", proj), part
        return
    yield name, tensor


def _load_state_dict(model: Transformer, tensors: dict, dtype, device):
    """Strictly map checkpoint tensors onto the (meta) model, then assign them one at a time."""
    cfg = model.config
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}  # tied copy, if saved
    found, unexpected, wrong_shape = {}, [], []
    for hf_name, (shape, _) in tensors.items():
        if _IGNORED.search(hf_name):
            continue
        for name, t in _convert(cfg, hf_name, torch.empty(shape, device="meta")):
            found[name] = hf_name
            if name not in expected:
                unexpected.append(hf_name)
            elif tuple(t.shape) != expected[name]:
                wrong_shape.append(f"{hf_name}: checkpoint {tuple(t.shape)} vs model {expected[name]}")
    missing = sorted(set(expected) - set(found))
    if missing or unexpected or wrong_shape:
        raise CheckpointError("checkpoint does not match the model config:"
                              + (f"\n  missing tensors: {missing}" if missing else "")
                              + (f"\n  unexpected tensors: {sorted(set(unexpected))}" if unexpected else "")
                              + (f"\n  wrong shapes: {wrong_shape}" if wrong_shape else "")
                              + "\nCheck that config.json belongs to these weights.")
    state = {}
    for hf_name, (_, load) in tensors.items():
        if not _IGNORED.search(hf_name):
            for name, t in _convert(cfg, hf_name, load()):
                state[name] = t.to(device=device, dtype=dtype).contiguous()
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the shared Parameter with two; share it again


# ----------------------------------------------------------------------------- GGUF (llama.cpp)

_GGUF_RENAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def unpermute_qk(w, n_head: int):
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf `permute`): per head, llama.cpp
    interleaves the two rotary halves (rows 0,h,1,h+1,...); HF keeps them as two contiguous halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _read_gguf(path: Path):
    try:
        import gguf
    except ImportError as e:
        raise ImportError("loading .gguf files needs the gguf package: pip install gguf") from e
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e} (corrupt or truncated GGUF file?)") from e
    big_arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    meta = {k: f.contents() for k, f in reader.fields.items() if k not in big_arrays}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: 'llama' "
                         "(Llama, Mistral, TinyLlama, SmolLM2). Convert other models from HF safetensors.")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    names = {t.name for t in reader.tensors}
    n_head, n_embd = meta["llama.attention.head_count"], meta["llama.embedding_length"]
    cfg = ModelConfig(
        family="llama", vocab_size=len(tokens), n_layer=meta["llama.block_count"], n_head=n_head,
        n_kv_head=meta.get("llama.attention.head_count_kv", n_head), d_model=n_embd,
        d_ff=meta["llama.feed_forward_length"], head_dim=meta.get("llama.attention.key_length", n_embd // n_head),
        max_position=meta.get("llama.context_length", 2048),
        norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.get("llama.rope.freq_base", 10000.0), tie_embeddings="output.weight" not in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))

    def load(t, n_rows_head):
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32"))  # copy: off the read-only mmap
        w = w.reshape(tuple(int(s) for s in reversed(t.shape)))  # ggml lists dims innermost first
        return unpermute_qk(w, n_rows_head) if n_rows_head else w

    tensors = {}
    for t in reader.tensors:
        parts = t.name.split(".")  # "blk.3.attn_q.weight" or "token_embd.weight"
        if parts[0] == "blk" and parts[2] in _GGUF_RENAMES:
            name = f"model.layers.{parts[1]}.{_GGUF_RENAMES[parts[2]]}.{parts[-1]}"
        else:
            name = f"{_GGUF_RENAMES.get(parts[0], parts[0])}.{'.'.join(parts[1:])}"
        heads = {"attn_q": cfg.n_head, "attn_k": cfg.n_kv_head}.get(parts[2] if parts[0] == "blk" else "")
        tensors[name] = (tuple(int(s) for s in reversed(t.shape)), lambda t=t, h=heads: load(t, h))
    return cfg, tensors, _gguf_tokenizer(reader, meta)


# ----------------------------------------------------------------------------- tokenizer

def byte_level_bpe(vocab: dict, merges: list, special_tokens=(), split_digits=False):
    """GPT-2 style byte-level BPE as a `tokenizers.Tokenizer` (identical to GPT-2's tokenizer.json)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_tokens])
    return tok


def _gguf_tokenizer(reader, meta):
    if meta.get("tokenizer.ggml.model") != "gpt2":
        return None  # SentencePiece ("llama") vocabularies are not rebuilt here; use the HF tokenizer.json
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    special = [tok for tok, ty in zip(tokens, types) if ty in (3, 4)]  # CONTROL, USER_DEFINED
    # llama.cpp's "smollm"/"starcoder" pre-tokenizers split digits one by one before byte-level BPE.
    split_digits = meta.get("tokenizer.ggml.pre") in ("smollm", "starcoder")
    return byte_level_bpe({t: i for i, t in enumerate(tokens)}, merges, special, split_digits)


def load_tokenizer(d: Path):
    """tokenizer.json if present, else vocab.json + merges.txt (GPT-2 calls it vocab.bpe), else None."""
    from tokenizers import Tokenizer
    if (d / "tokenizer.json").exists():
        return Tokenizer.from_file(str(d / "tokenizer.json"))
    merges = next((d / m for m in ("merges.txt", "vocab.bpe") if (d / m).exists()), None)
    if (d / "vocab.json").exists() and merges:
        vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
        special = [s for s in ("<|endoftext|>",) if s in vocab]
        merge_list = [tuple(line.split(" ")) for line in merges.read_text(encoding="utf-8").splitlines()
                      if line and not line.startswith("#version")]
        return byte_level_bpe(vocab, merge_list, special)
    return None


# ----------------------------------------------------------------------------- load_pretrained

def _resolve(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    looks_like_path = (path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
                       or name_or_path.endswith(".gguf"))
    if looks_like_path:
        raise FileNotFoundError(f"no such file or directory: {name_or_path!r} (expected a model directory "
                                "with config.json, a .gguf file, or a hub id like 'gpt2' or 'HuggingFaceTB/SmolLM2-135M')")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "vocab.json", "merges.txt"]))
    except Exception as e:
        raise OSError(f"could not download {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                      "The hub may be unreachable: pass a local model directory or a .gguf file instead.") from e


def load_pretrained(name_or_path, dtype=torch.float32, device="cpu"):
    """Load (model, tokenizer) from a local HF directory, a hub id, or a llama.cpp .gguf file.

    The model is built on the meta device and each checkpoint tensor is materialised once, directly
    in `dtype` on `device`; names and shapes must match exactly (no random init, no strict=False).
    The tokenizer is a `tokenizers.Tokenizer`, or None when the checkpoint ships none.
    """
    path = _resolve(str(name_or_path))
    if path.is_file() and path.suffix == ".gguf":
        cfg, tensors, tokenizer = _read_gguf(path)
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face model directory")
        cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
        tensors, tokenizer = _read_hf_dir(path), load_tokenizer(path)
    else:
        raise ValueError(f"{path} is neither a model directory nor a .gguf file")
    with torch.device("meta"):
        model = Transformer(cfg)
    _load_state_dict(model, tensors, dtype, device)
    return model.eval(), tokenizer
