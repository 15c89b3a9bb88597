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
loading (HF dirs, hub ids, GGUF) -> tokenizer -> export (HF checkpoint, PEFT adapter).

Interface used by the rest of the project:

    model, tokenizer = load_pretrained("path/or/hub-id/or/file.gguf", dtype=torch.bfloat16)
    logits, loss = model(input_ids, targets)       # targets already shifted by the caller
    loss = model.loss(input_ids, targets, attention_mask)  # the same loss, logits only where there are targets
    h = model.hidden_states(input_ids, attention_mask)               # (B, T, d), final-normed
    scores = ClassificationHead(d_model, num_labels)(h, attention_mask)  # GLUE: reads the last real token
    cache = model.new_cache(batch_size, max_len)   # then model(new_ids, attention_mask=..., cache=cache)
    out = model.generate(input_ids, max_new_tokens, eos_token_id, attention_mask)
    save_hf_checkpoint(model, tokenizer, "out/hf")    # merged weights, for transformers' from_pretrained
    save_peft_adapter(model, "out/peft", "gpt2")      # LoRA of rank r + t on the original base, for PEFT
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import kasa

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
    # {"rope_type": "linear"|"llama3", "factor": ..., ...}, or {"rope_type": "freq_factors", "factors": [...]}:
    # per-frequency divisors, as llama.cpp stores Llama 3.1's scaling in a GGUF (tensor rope_freqs)
    rope_scaling: dict | None = None
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
    """Inverse frequencies (head_dim/2,), fp32 on CPU, with optional linear, Llama-3.1 or per-frequency scaling."""
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
    elif scaling.get("rope_type") == "freq_factors":
        inv_freq = inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32, device="cpu")
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

    k[layer], v[layer]: (batch, n_kv_head, max_len, head_dim). Filled in one of two ways:

    Together: `length` positions of every row are filled. Every layer writes its new keys/values
    at [length, length + T) and the model advances `length` by T after the last layer, so one
    forward call appends T positions. The caller owns the attention mask: pass attention_mask of
    shape (B, length + T) with 1 for real tokens and 0 for padding (left padding is the usual choice
    for batched prompts).

    Row by row (continuous batching: a row whose text is done takes the next prompt): once
    `start_rows` has given some rows a new sequence, each row b has its own `row_lengths[b]`; a
    forward call appends each row's T new tokens at its own positions [row_lengths[b], + T), the
    model numbers them from there and masks every key past a row's own length (no attention_mask:
    such rows hold no padding). `length` is then the longest row, the keys the attention reads.

    Beam search: `expand(n)` repeats every row n times (row b -> rows b*n .. b*n+n-1, like
    repeat_interleave), and `reorder(index)` keeps rows `index` (index_select along batch),
    e.g. the parent beam of every surviving hypothesis. Reorder the attention mask the same way.
    """

    def __init__(self, n_layer, batch_size, n_kv_head, head_dim, max_len, dtype, device):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.length = 0
        self.row_lengths: torch.Tensor | None = None  # (B,) long, once filled row by row
        self._scratch = None  # one layer's buffer for in-place reorders, made on first use

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def positions(self, T: int) -> torch.Tensor:
        """(B, T): the position each row's next T tokens take."""
        start = self.row_lengths[:, None] if self.row_lengths is not None else self.length
        return start + torch.arange(T, device=self.k[0].device)

    def update(self, layer: int, k, v):
        """Store new k/v (B, n_kv_head, T, head_dim) for `layer`; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}; "
                             "create the cache with a larger max_len")
        if self.row_lengths is None:
            self.k[layer][:, :, self.length:end] = k
            self.v[layer][:, :, self.length:end] = v
        else:  # row b's token t goes to position row_lengths[b] + t
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            positions = self.positions(k.shape[2])
            self.k[layer][rows, :, positions] = k.transpose(1, 2)
            self.v[layer][rows, :, positions] = v.transpose(1, 2)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        """T new positions of every row are written (the model calls this after its last layer)."""
        self.length += T
        if self.row_lengths is not None:
            self.row_lengths += T

    def start_rows(self, rows, lengths, source: "KVCache | None" = None, source_rows=None) -> "KVCache":
        """Give each row rows[i] a new sequence of lengths[i] positions, copied from row source_rows[i]
        of `source` (a cache of the same model, e.g. the prefill of a new prompt); lengths of 0 need
        no source. From then on the cache is filled row by row (see the class docstring)."""
        if self.row_lengths is None:
            self.row_lengths = torch.full((self.batch_size,), self.length, device=self.k[0].device)
        rows = torch.as_tensor(rows, device=self.k[0].device)
        if source is not None and source.length:
            n, source_rows = source.length, torch.as_tensor(source_rows, device=self.k[0].device)
            for mine, theirs in zip(self.k + self.v, source.k + source.v):
                mine[rows, :, :n] = theirs[source_rows, :, :n]  # past a row's length: masked, then overwritten
        self.row_lengths[rows] = torch.as_tensor(lengths, device=self.k[0].device)
        self.length = int(self.row_lengths.max())
        return self

    def reorder(self, index: torch.Tensor, start: int = 0) -> "KVCache":
        """Keep rows `index`. With as many rows as before it works in place and copies positions
        [start, length) only: positions before `start` must already be equal in every row and its
        new parent (the prompt that all beams of a prompt share)."""
        if self.row_lengths is not None:
            self.row_lengths = self.row_lengths[index]
            self.length = int(self.row_lengths.max()) if len(index) else 0
        if len(index) != self.batch_size:
            self.k = [k.index_select(0, index) for k in self.k]
            self.v = [v.index_select(0, index) for v in self.v]
            self._scratch = None
            return self
        if self._scratch is None:
            self._scratch = torch.empty_like(self.k[0])
        part = slice(start, self.length)
        for buffer in self.k + self.v:  # gather into the scratch, copy back: no new allocation per step
            torch.index_select(buffer[:, :, part], 0, index, out=self._scratch[:, :, part])
            buffer[:, :, part] = self._scratch[:, :, part]
        return self

    def expand(self, n: int) -> "KVCache":
        self.k = [k.repeat_interleave(n, dim=0) for k in self.k]
        self.v = [v.repeat_interleave(n, dim=0) for v in self.v]
        if self.row_lengths is not None:
            self.row_lengths = self.row_lengths.repeat_interleave(n)
        self._scratch = None
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

def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding with its N(0, 1) init, skipped on the meta device (load_pretrained builds there and
    assigns every tensor from the checkpoint): normal_ on a meta tensor imports torch._dynamo, which
    costs more than reading a small model's weights."""
    weight = torch.empty(num, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding.from_pretrained(weight, freeze=False)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = embedding(cfg.max_position, cfg.d_model) if cfg.family == "gpt2" else None
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

    def _attention_mask(self, attention_mask, T, past, device, row_positions=None):
        """Boolean (B or 1, 1, T, past+T) mask of allowed keys, or None when SDPA's is_causal suffices.
        row_positions (B, T): each query's own position, for a cache filled row by row."""
        S = past + T
        window = self.config.sliding_window
        windowed = window is not None and S > window
        if attention_mask is None and row_positions is None and (past == 0 or T == 1) and not windowed:
            return None
        if attention_mask is not None and attention_mask.shape[-1] != S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected "
                             f"cached + new = {past} + {T} = {S}")
        if row_positions is None:
            q_pos = torch.arange(past, S, device=device)[:, None]
        else:  # (B, 1, T, 1): a row's keys past its own position are another sequence's, or empty
            q_pos = row_positions[:, None, :, None]
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
        cached .. cached + T - 1 without a mask. A cache filled row by row sets both itself.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        by_row = cache is not None and cache.row_lengths is not None
        if by_row and (attention_mask is not None or position_ids is not None):
            raise ValueError("a KV cache filled row by row (start_rows) sets the mask and positions itself: "
                             "pass no attention_mask or position_ids")
        if by_row:
            position_ids = cache.positions(T)
        elif position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        mask = self._attention_mask(attention_mask, T, past, input_ids.device, position_ids if by_row else None)
        is_causal = mask is None and past == 0 and T > 1
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        x = self.drop(x)
        rope = rope_cos_sin(self.inv_freq, position_ids, x.dtype) if self.inv_freq is not None else None
        for block in self.blocks:
            x = block(x, rope, mask, is_causal, cache)
        if cache is not None:
            cache.advance(T)
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

    def loss(self, input_ids, targets, attention_mask=None, ignore_index: int = -100, label_smoothing: float = 0.0):
        """forward's loss, without the logits: the lm_head and the cross-entropy run only where targets
        != ignore_index. A training step needs nothing else, and the lm_head is a fifth of a small
        model's compute (SmolLM2-135M: 49152 x 576) and its fp32 logits the largest activation;
        in E2E fine-tuning about half the positions (the MR and the padding) have no target."""
        hidden = self.hidden_states(input_ids, attention_mask)
        has_target = targets != ignore_index
        return F.cross_entropy(self.lm_head(hidden[has_target]).float(), targets[has_target],
                               label_smoothing=label_smoothing)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, eos_token_id=None, attention_mask=None):
        """Greedy decoding with a KV cache. Batched prompts must be LEFT-padded (with attention_mask).

        Returns (B, T + n) ids, n <= max_new_tokens; a row that emitted eos_token_id (int or list)
        is padded with that eos id until every row is done.
        """
        B, T = input_ids.shape
        mask = attention_mask  # None: no padding, and no mask to build at every step
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
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            if done.all():
                break
        return out


# ----------------------------------------------------------------------------- sequence classification
# GLUE on a decoder: under causal attention only the last real token has seen the whole sequence,
# so a linear head reads the hidden state there (as transformers' GPT2ForSequenceClassification).

def last_token_states(hidden, attention_mask):
    """(B, T, d) hidden states -> (B, d): each row's state at its last position with attention_mask 1.

    Found from the mask, not from a pad id, so it works with left or right padding and with models
    that pad with eos (GPT-2 has no pad token)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = torch.where(attention_mask.bool(), positions, -1).amax(dim=1)
    if (last < 0).any():
        raise ValueError("a row of attention_mask is all zeros: every sequence needs at least one token")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class ClassificationHead(nn.Module):
    """num_labels scores from the last real token's hidden state (num_labels=1: a regression, e.g. STS-B).

    It lives beside the Transformer, not inside it, so adapters see the same module names with or
    without a head; it trains with the adapter and is saved beside it."""

    def __init__(self, d_model: int, num_labels: int):
        super().__init__()
        self.score = nn.Linear(d_model, num_labels)

    def forward(self, hidden, attention_mask):
        return self.score(last_token_states(hidden, attention_mask).to(self.score.weight.dtype))


# ----------------------------------------------------------------------------- checkpoint readers
# Every reader returns {hf_name: (shape, load)} where load(dtype) materialises that one tensor, in
# `dtype`, on the CPU. Names and shapes are validated before any weight is read, and weights are
# read one at a time, so loading holds the model plus at most one tensor in the file's format.
#
# Files are read with plain reads, not memory-mapped: the pages of a mapped file count as the
# process's memory for as long as the mapping lives, so casting a mapped bf16 file to fp32 would
# hold the whole file and the whole fp32 model at once.

class CheckpointError(ValueError):
    pass


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_tensor(path: Path, offset: int, dtype, shape) -> torch.Tensor:
    """A new tensor of `dtype` and `shape` holding the bytes of `path` from `offset`, read straight into it."""
    out = torch.empty(shape, dtype=dtype)
    buffer = out.reshape(-1).view(torch.uint8).numpy()
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(buffer) != buffer.nbytes:
            raise CheckpointError(f"{path} ends early: the file is truncated (re-download it)")
    return out


def _read_safetensors(path: Path):
    """A .safetensors file: the header's length (8 bytes, little-endian), a JSON header
    {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the tensors' raw bytes."""
    file_size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > file_size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size {file_size}")
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        tensors, data_start = {}, 8 + header_len
        for name, info in header.items():
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name} has dtype {info['dtype']}; supported: {sorted(_SAFETENSORS_DTYPES)}")
            dtype, shape, (begin, end) = _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize or data_start + end > file_size:
                raise ValueError(f"tensor {name}: bytes {begin}..{end} do not hold shape {shape} "
                                 f"or lie past the end of the file")
            tensors[name] = (shape, lambda to_dtype, dtype=dtype, shape=shape, offset=data_start + begin:
                             _read_tensor(path, offset, dtype, shape).to(to_dtype))  # no copy if dtypes agree
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {path}: {e} (corrupt or truncated safetensors file? re-download it)") from e
    return tensors


def _read_torch_bin(path: Path):
    try:  # weights_only: never execute pickled code; mmap: no second copy in memory
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e} (corrupt or truncated pytorch_model.bin? re-download it)") from e
    return {name: (tuple(t.shape), lambda dtype, t=t: t.to(dtype)) for name, t in sd.items()}


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


# ----------------------------------------------------------------------------- HF names <-> our names
# One table per family of (HF module, our module) pairs; "{i}" is a block index. Loading reads it
# left to right, export (save_hf_checkpoint, save_peft_adapter) right to left, so a rename lives in
# one place. A name keeps whatever follows the matched module (".weight", ".q_proj.bias", ...).
_MODULE_NAMES = {
    "llama": [
        ("model.embed_tokens", "tok_emb"),
        ("model.norm", "norm_f"),
        ("model.layers.{i}.input_layernorm", "blocks.{i}.norm1"),
        ("model.layers.{i}.post_attention_layernorm", "blocks.{i}.norm2"),
        ("model.layers.{i}.self_attn", "blocks.{i}.attn"),
        ("model.layers.{i}.mlp", "blocks.{i}.mlp"),
    ],
    "gpt2": [
        ("transformer.wte", "tok_emb"),
        ("transformer.wpe", "pos_emb"),
        ("transformer.ln_f", "norm_f"),
        ("transformer.h.{i}.ln_1", "blocks.{i}.norm1"),
        ("transformer.h.{i}.ln_2", "blocks.{i}.norm2"),
        ("transformer.h.{i}.attn.c_proj", "blocks.{i}.attn.o_proj"),
        ("transformer.h.{i}.attn.c_attn", "blocks.{i}.attn.c_attn"),  # q|k|v fused: split at load (_convert)
        ("transformer.h.{i}.mlp", "blocks.{i}.mlp"),
    ],
}


def _rename(cfg: ModelConfig, name: str, to_hf: bool) -> str:
    """A tensor or module name, HF's -> ours (to_hf=False) or ours -> HF's, by the first matching pair."""
    for hf, ours in _MODULE_NAMES[cfg.family]:
        source, target = (ours, hf) if to_hf else (hf, ours)
        match = re.match(re.escape(source).replace(r"\{i\}", r"(?P<i>\d+)") + r"(?=\.|$)", name)
        if match:
            return target.format(**match.groupdict()) + name[match.end():]
    return name


# Constant buffers that some checkpoints carry; they are recomputed, not loaded.
_IGNORED = re.compile(r"(\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$)")


def _convert(cfg: ModelConfig, hf_name: str, tensor):
    """Yield (our_name, tensor) for one checkpoint tensor. Works on meta tensors too (dry run)."""
    if cfg.family == "gpt2" and not hf_name.startswith(("transformer.", "lm_head.")):
        hf_name = "transformer." + hf_name  # GPT2Model's checkpoints (no LM head) drop the prefix
    name = _rename(cfg, hf_name, to_hf=False)
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
            for name, t in _convert(cfg, hf_name, load(dtype)):
                state[name] = t.to(device).contiguous()
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the shared Parameter with two; share it again


# ----------------------------------------------------------------------------- GGUF (llama.cpp)
# A .gguf file, little-endian throughout:
#   b"GGUF", version (u32), tensor count (u64), metadata count (u64)
#   metadata:     key (string), value type (u32), value
#   tensor index: name (string), n_dims (u32), dims innermost first (u64 each), ggml type (u32),
#                 offset (u64) from the start of the data
#   tensor data:  from the next multiple of general.alignment (default 32)
# A string is a u64 length and UTF-8 bytes; an array is an item type (u32), a count (u64), the items.
# The header is parsed here; the gguf package only dequantizes (gguf.quants).

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_RENAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_CHUNK = 1 << 20  # elements dequantized at a time: the float32 intermediates stay a few MB


def _parse_gguf_header(f, file_size: int):
    """(metadata {key: value}, tensor index [(name, shape, ggml type, offset)], data start) of a GGUF file."""
    def read(n):
        if n > file_size - f.tell():
            raise ValueError(f"a field of {n} bytes at byte {f.tell()} runs past the end of the file")
        return f.read(n)

    def unpack(fmt):
        return struct.unpack("<" + fmt, read(struct.calcsize("<" + fmt)))

    def value(kind):
        if kind == _GGUF_STRING:
            return read(unpack("Q")[0]).decode("utf-8")
        if kind == _GGUF_ARRAY:
            item_kind, n = unpack("IQ")
            if item_kind in _GGUF_SCALARS:
                return list(unpack(f"{n}{_GGUF_SCALARS[item_kind]}"))
            return [value(item_kind) for _ in range(n)]
        if kind not in _GGUF_SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return unpack(_GGUF_SCALARS[kind])[0]

    magic, version, n_tensors, n_meta = unpack("4sIQQ")
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"not a GGUF v2/v3 file (magic {magic!r}, version {version})")
    meta = {}
    for _ in range(n_meta):
        key = value(_GGUF_STRING)
        meta[key] = value(unpack("I")[0])
    index = []
    for _ in range(n_tensors):
        name = value(_GGUF_STRING)
        (n_dims,) = unpack("I")
        dims = unpack(f"{n_dims}Q")
        ggml_type, offset = unpack("IQ")
        index.append((name, tuple(reversed(dims)), ggml_type, offset))  # PyTorch order: outermost first
    alignment = meta.get("general.alignment", 32)
    return meta, index, -(-f.tell() // alignment) * alignment


def unpermute_qk(w, n_head: int):
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf `permute`): per head, llama.cpp
    interleaves the two rotary halves (rows 0,h,1,h+1,...); HF keeps them as two contiguous halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _load_gguf_tensor(path: Path, offset: int, ggml_type, shape, dtype, n_head=None) -> torch.Tensor:
    """Dequantize one tensor into a new `dtype` tensor, a few rows at a time. A row of a ggml tensor
    is a whole number of quantization blocks, so rows dequantize independently of each other."""
    from gguf import GGML_QUANT_SIZES, quants
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    rows, cols = math.prod(shape[:-1]), shape[-1]
    row_bytes = cols // block * block_bytes
    out = torch.empty(rows, cols, dtype=dtype)
    step = max(1, _GGUF_CHUNK // cols)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        raw = _read_tensor(path, offset + start * row_bytes, torch.uint8, (n, row_bytes)).numpy()
        out[start:start + n] = torch.from_numpy(quants.dequantize(raw, ggml_type))
    out = out.reshape(shape)
    return unpermute_qk(out, n_head) if n_head else out


def _read_gguf(path: Path):
    try:
        import gguf
        import numpy as np
    except ImportError as e:
        raise ImportError("loading .gguf files needs the gguf package: pip install gguf") from e
    file_size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            meta, index, data_start = _parse_gguf_header(f, file_size)
    except (struct.error, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"cannot read {path}: {e} (corrupt or truncated GGUF file? re-download it)") from e
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: 'llama' "
                         "(Llama, Mistral, TinyLlama, SmolLM2). Convert other models from HF safetensors.")

    # Check every tensor's type, size and place in the file before reading any of them.
    for name, shape, ggml_type, offset in index:
        try:
            ggml_type = gguf.GGMLQuantizationType(ggml_type)
            block, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
            gguf.quants.dequantize(np.zeros((1, block_bytes), np.uint8), ggml_type)  # can this gguf decode it?
        except (ValueError, KeyError, NotImplementedError) as e:
            raise CheckpointError(f"{path}: tensor {name} has ggml type {ggml_type!r}, which gguf "
                                  f"{getattr(gguf, '__version__', '')} cannot dequantize ({e}); try upgrading gguf") from e
        if shape[-1] % block or data_start + offset + math.prod(shape) // block * block_bytes > file_size:
            raise CheckpointError(f"cannot read {path}: tensor {name} {shape} of type {ggml_type.name} does not "
                                  "fit the file (corrupt or truncated GGUF file? re-download it)")
    located = {name: (shape, gguf.GGMLQuantizationType(t), data_start + offset) for name, shape, t, offset in index}

    try:
        n_head, d_model = meta["llama.attention.head_count"], meta["llama.embedding_length"]
        head_dim = meta.get("llama.attention.key_length", d_model // n_head)
        if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
            raise ValueError("partial rotary embeddings (llama.rope.dimension_count < head_dim) are not supported")
        scaling = meta.get("llama.rope.scaling.type", "none")
        if scaling == "linear":
            rope_scaling = {"rope_type": "linear", "factor": meta["llama.rope.scaling.factor"]}
        elif scaling == "none":
            rope_scaling = None
        else:
            raise ValueError(f"unsupported RoPE scaling {scaling!r}; supported: none, linear, rope_freqs (Llama 3.1)")
        if "rope_freqs.weight" in located:  # Llama 3.1's frequency scaling, precomputed by llama.cpp
            shape, ggml_type, offset = located.pop("rope_freqs.weight")
            factors = _load_gguf_tensor(path, offset, ggml_type, shape, torch.float32)
            rope_scaling = {"rope_type": "freq_factors", "factors": factors.tolist()}
        cfg = ModelConfig(
            family="llama", vocab_size=located["token_embd.weight"][0][0], n_layer=meta["llama.block_count"],
            n_head=n_head, n_kv_head=meta.get("llama.attention.head_count_kv", n_head), d_model=d_model,
            d_ff=meta["llama.feed_forward_length"], head_dim=head_dim,
            max_position=meta.get("llama.context_length", 2048),
            norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=meta.get("llama.rope.freq_base", 10000.0), rope_scaling=rope_scaling,
            tie_embeddings="output.weight" not in located, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"), pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    except KeyError as e:
        raise CheckpointError(f"{path}: the GGUF metadata or tensors lack {e}, which a llama model needs") from e

    tensors = {}
    for gguf_name, (shape, ggml_type, offset) in located.items():
        parts = gguf_name.split(".")  # "blk.3.attn_q.weight" or "token_embd.weight"
        if parts[0] == "blk" and parts[2] in _GGUF_RENAMES:
            name = f"model.layers.{parts[1]}.{_GGUF_RENAMES[parts[2]]}.{parts[-1]}"
        else:
            name = f"{_GGUF_RENAMES.get(parts[0], parts[0])}.{'.'.join(parts[1:])}"
        n_head = {"attn_q": cfg.n_head, "attn_k": cfg.n_kv_head}.get(parts[2] if parts[0] == "blk" else "")
        tensors[name] = (shape, lambda dtype, shape=shape, t=ggml_type, offset=offset, n_head=n_head:
                         _load_gguf_tensor(path, offset, t, shape, dtype, n_head))
    return cfg, tensors, _gguf_tokenizer(meta)


# ----------------------------------------------------------------------------- tokenizer

# How llama.cpp's pre-tokenizers (GGUF key tokenizer.ggml.pre) split text into words before BPE.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_PRE_TOKENIZERS = {"gpt2": "gpt2", "smollm": "digits", "starcoder": "digits", "llama-bpe": "llama3",
                        "llama3": "llama3"}


def byte_level_bpe(vocab: dict, merges: list, special_tokens=(), pre="gpt2"):
    """Byte-level BPE as a `tokenizers.Tokenizer`. `pre` picks how text is split into words first:
    "gpt2" (GPT-2's regex: identical to GPT-2's tokenizer.json), "digits" (every digit alone, then
    GPT-2's regex: SmolLM2, StarCoder) or "llama3" (Llama 3's regex: numbers in groups of up to 3)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    gpt2_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = {
        "gpt2": gpt2_regex,
        "digits": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2_regex]),
        "llama3": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    }[pre]
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_tokens])
    return tok


def _gguf_tokenizer(meta):
    if meta.get("tokenizer.ggml.model") != "gpt2":
        return None  # SentencePiece ("llama") vocabularies are not rebuilt here; use the HF tokenizer.json
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in _GGUF_PRE_TOKENIZERS:
        raise ValueError(f"the GGUF's tokenizer uses llama.cpp's pre-tokenizer {pre!r}, which is not rebuilt here "
                         f"(supported: {sorted(_GGUF_PRE_TOKENIZERS)}); load the model's Hugging Face directory instead")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    special = [tok for tok, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind in (3, 4)]  # CONTROL, USER_DEFINED
    return byte_level_bpe({t: i for i, t in enumerate(tokens)}, merges, special, _GGUF_PRE_TOKENIZERS[pre])


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


# ----------------------------------------------------------------------------- export
# Two ways to hand a fine-tuned model to other tools, both in Hugging Face's layout:
#   save_hf_checkpoint  the merged weights W_world + ΔW (zero added latency), for
#                       transformers' from_pretrained and for load_pretrained;
#   save_peft_adapter   a plain LoRA adapter of rank r + t for the ORIGINAL, untouched base
#                       (kasa.lora_factors), for peft.PeftModel.from_pretrained or any LoRA server.
# Names go back through _MODULE_NAMES; GPT-2's q/k/v are fused back into
# one Conv1D c_attn, whose weight is stored (in, out).

_GPT2_FUSED = ("q_proj", "k_proj", "v_proj")  # c_attn's row blocks, top to bottom


def _hf_module(cfg: ModelConfig, name: str) -> tuple[str, int, int]:
    """Our module name -> (HF module name, its row block there, the number of row blocks).

    Every module is one block of its own, except GPT-2's q/k/v: blocks 0, 1, 2 of c_attn."""
    block_of, _, proj = name.rpartition(".")
    if cfg.family == "gpt2" and proj in _GPT2_FUSED:
        return _rename(cfg, block_of + ".c_attn", to_hf=True), _GPT2_FUSED.index(proj), len(_GPT2_FUSED)
    return _rename(cfg, name, to_hf=True), 0, 1


def _is_conv1d(cfg: ModelConfig, hf_module: str) -> bool:
    """HF GPT-2's linear layers are Conv1D: weight (in, out), the transpose of nn.Linear's."""
    return cfg.family == "gpt2" and re.search(r"\.(c_attn|c_proj|c_fc)$", hf_module) is not None


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """ModelConfig -> a config.json that transformers (4.x and 5.x) and ModelConfig.from_hf both read."""
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
                  eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, dtype=str(dtype).removeprefix("torch."))
    if cfg.family == "gpt2":
        if (cfg.n_kv_head != cfg.n_head or cfg.n_head * cfg.head_dim != cfg.d_model or not cfg.attn_bias
                or not cfg.mlp_bias or cfg.activation not in ("gelu_tanh", "gelu")):
            raise ValueError("this gpt2-family model has no GPT-2 config.json: GPT-2 needs n_kv_head == n_head, "
                             "head_dim == d_model / n_head, biases on every linear layer and a gelu activation")
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=cfg.d_model, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, n_inner=cfg.d_ff, n_positions=cfg.max_position,
                    layer_norm_epsilon=cfg.norm_eps,
                    activation_function={"gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.activation], **common)
    # A LLaMA with a sliding window is a Mistral to transformers (LlamaConfig has no window).
    model_type = "mistral" if cfg.sliding_window else "llama"
    if cfg.activation != "silu" or (model_type == "mistral" and (cfg.attn_bias or cfg.mlp_bias)):
        raise ValueError(f"this llama-family model has no {model_type} config.json: it needs the SwiGLU (silu) "
                         "MLP" + (", and Mistral has no biases" if model_type == "mistral" else ""))
    # RoPE as rope_theta + rope_scaling: transformers 5 still reads these, and 4.x reads nothing else.
    return dict(architectures=["MistralForCausalLM" if cfg.sliding_window else "LlamaForCausalLM"],
                model_type=model_type, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position, rms_norm_eps=cfg.norm_eps,
                hidden_act="silu", rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
                sliding_window=cfg.sliding_window, attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias, **common)


def _merged_weight(layer: kasa.KaSALinear) -> torch.Tensor:
    """W_world + ΔW in the base dtype, as layer.merge() would store it, but leaving the layer as it is."""
    if layer.merged:
        return layer.weight
    return (layer.weight.to(layer.kasa_A.dtype) + layer.delta_weight()).to(layer.weight.dtype)


@torch.no_grad()
def hf_state_dict(model: Transformer) -> dict:
    """The model's weights under HF names, every KaSA layer merged; the model itself is not changed."""
    cfg = model.config
    if cfg.tie_embeddings and model.lm_head.weight is not model.tok_emb.weight:
        raise ValueError("lm_head is no longer tied to the embedding (was it adapted?), but the config says "
                         "tie_embeddings=True, so a checkpoint would drop it: adapt other layers than lm_head")
    merged = {f"{name}.weight": _merged_weight(layer)
              for name, layer in model.named_modules() if isinstance(layer, kasa.KaSALinear)}
    blocks = {}  # HF tensor name -> {row block: tensor}
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if leaf.startswith("kasa_") or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue  # the adapter is merged into the weight; a tied lm_head is the embedding
        hf_module, block, _ = _hf_module(cfg, module)
        blocks.setdefault(f"{hf_module}.{leaf}", {})[block] = merged.get(name, tensor)
    state = {}
    for hf_name, parts in blocks.items():
        tensor = parts[0] if len(parts) == 1 else torch.cat([parts[i] for i in sorted(parts)])
        if tensor.dim() == 2 and _is_conv1d(cfg, hf_name.rpartition(".")[0]):
            tensor = tensor.t()
        state[hf_name] = tensor.detach().cpu().contiguous()
    return state


@torch.no_grad()
def peft_lora_weights(model: Transformer) -> dict:
    """{HF module name: (lora_B (out, rank), lora_A (rank, in))} with lora_B @ lora_A = W_world + ΔW − W.

    One kasa.lora_factors pair per KaSA layer. GPT-2's c_attn gets one pair for q, k and v together:
    their ranks are stacked, and lora_B is zero in the rows of a projection that was not adapted."""
    cfg = model.config
    factors = {}  # HF module -> {row block: (B_total, A_total)}, and its number of row blocks
    for name, layer in model.named_modules():
        if isinstance(layer, kasa.KaSALinear):
            hf_module, block, n_blocks = _hf_module(cfg, name)
            factors.setdefault(hf_module, ({}, n_blocks))[0][block] = kasa.lora_factors(layer)
    if not factors:
        raise ValueError("the model has no KaSA layers, so there is no adapter to export: "
                         "save_hf_checkpoint writes a fully fine-tuned model")
    lora = {}
    for hf_module, (pairs, n_blocks) in factors.items():
        A = torch.cat([pairs[i][1] for i in sorted(pairs)])
        out = next(iter(pairs.values()))[0].shape[0]  # every row block of c_attn has the same height
        B = A.new_zeros(n_blocks * out, A.shape[0])
        rank = 0
        for i in sorted(pairs):
            B_i = pairs[i][0]
            B[i * out:(i + 1) * out, rank:rank + B_i.shape[1]] = B_i
            rank += B_i.shape[1]
        lora[hf_module] = (B, A)
    return lora


def _write_dir_atomic(out_dir, file_names: tuple, write):
    """Call write(directory) on a fresh directory beside out_dir, then move it into place.

    A crash leaves either the old export or the new one, never half of one. An existing out_dir
    is replaced only if it holds nothing but `file_names` (so a run directory is never lost)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file: export into a directory")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in file_names) if out_dir.exists() else []
    if foreign:
        raise FileExistsError(f"{out_dir} exists and holds other files ({', '.join(foreign[:5])}); "
                              f"export into a new or empty directory, e.g. {out_dir / 'export'}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out_dir.with_name(f".{out_dir.name}.{suffix}{os.getpid()}") for suffix in ("tmp", "old"))
    for leftover in (tmp, old):  # from a crashed export
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_hf_checkpoint(model: Transformer, tokenizer, out_dir):
    """Write the model, KaSA layers merged, as a Hugging Face checkpoint directory:

        config.json, model.safetensors (HF names, a tied lm_head left out), tokenizer.json (if given)

    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_pretrained(out_dir) read it.
    Weights keep the model's dtype. The model is not changed (nothing is merged in place)."""
    from safetensors.torch import save_file
    config, state = hf_config(model.config, model.tok_emb.weight.dtype), hf_state_dict(model)

    def write(directory: Path):
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})  # transformers checks it
        if tokenizer is not None:
            tokenizer.save(str(directory / "tokenizer.json"))
    _write_dir_atomic(out_dir, ("config.json", "model.safetensors", "tokenizer.json"), write)


def save_peft_adapter(model: Transformer, out_dir, base_model_name_or_path: str = ""):
    """Write the KaSA layers as a PEFT LoRA adapter for the ORIGINAL pretrained model:

        adapter_config.json, adapter_model.safetensors (keys base_model.model.<HF module>.lora_A/lora_B.weight)

    peft.PeftModel.from_pretrained(original_hf_model, out_dir) then computes exactly our fine-tuned
    model (kasa.lora_factors): rank r + t per layer (GPT-2's c_attn: the sum over its adapted q/k/v),
    float32, and lora_alpha = rank, so that PEFT's scaling lora_alpha / r is 1. Layers whose rank
    differs from the most common one are listed in rank_pattern and alpha_pattern."""
    from safetensors.torch import save_file
    cfg = model.config
    lora = peft_lora_weights(model)
    ranks = {hf_module: A.shape[0] for hf_module, (_, A) in lora.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {hf_module: rank for hf_module, rank in ranks.items() if rank != r}
    # Target modules by their last name (q_proj, c_attn), as PEFT users write them, unless that
    # name also selects layers that were not adapted (GPT-2's c_proj is in attn and in mlp): then
    # by their full names.
    linear = {_hf_module(cfg, name)[0] for name, m in model.named_modules()
              if isinstance(m, (nn.Linear, kasa.KaSALinear))}
    target_modules = []
    for last in sorted({hf_module.rpartition(".")[2] for hf_module in lora}):
        named = {hf_module for hf_module in linear if hf_module.rpartition(".")[2] == last}
        target_modules += [last] if named <= lora.keys() else sorted(named & lora.keys())
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": r, "rank_pattern": rank_pattern, "alpha_pattern": rank_pattern,
        "target_modules": target_modules,
        "fan_in_fan_out": cfg.family == "gpt2",  # HF GPT-2's Conv1D stores weights (in, out)
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }
    tensors = {}
    for hf_module, (B, A) in lora.items():
        tensors[f"base_model.model.{hf_module}.lora_A.weight"] = A.cpu().contiguous()
        tensors[f"base_model.model.{hf_module}.lora_B.weight"] = B.cpu().contiguous()

    def write(directory: Path):
        (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_dir_atomic(out_dir, ("adapter_config.json", "adapter_model.safetensors"), write)
