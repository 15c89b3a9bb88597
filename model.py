"""One decoder-only transformer for two families: GPT-2 and LLaMA-style models.

GPT-2 (gpt2 .. gpt2-xl) and LLaMA-style models (Llama 2/3 incl. "llama3" RoPE scaling, Mistral,
TinyLlama, SmolLM2) differ in a handful of choices; one `Transformer` covers both, by ModelConfig.family:

                    gpt2                         llama
    norm            LayerNorm (with bias)        RMSNorm
    positions       learned table (pos_emb)      RoPE, HF rotate-half layout
    MLP             c_fc -> gelu(tanh) -> c_proj gate_proj, up_proj -> SwiGLU -> down_proj
    heads           n_kv_head == n_head          grouped-query attention (n_kv_head <= n_head)

Attention projections are separate nn.Linear layers q_proj, k_proj, v_proj, o_proj in both families
(GPT-2's fused c_attn is split at load time), so KaSA adapters target the same names everywhere.

Reading order: config -> norm/RoPE -> attention + KV cache -> MLP -> block -> model -> classification
head -> load_pretrained. Machinery a reader may skip lives elsewhere: the file formats (safetensors,
.bin, GGUF, tokenizers, hub ids) in checkpoints.py, export in export.py.

    model, tokenizer = load_pretrained("path/or/hub-id/or/file.gguf", dtype=torch.bfloat16)
    logits, loss = model(input_ids, targets)       # targets already shifted by the caller
    loss = model.loss(input_ids, targets, attention_mask)  # the same loss, logits only where there are targets
    h = model.hidden_states(input_ids, attention_mask)               # (B, T, d), final-normed
    scores = ClassificationHead(d_model, num_labels)(h, attention_mask)  # GLUE: reads the last real token
    cache = model.new_cache(batch_size, max_len)   # then model(new_ids, attention_mask=..., cache=cache)
    out = model.generate(input_ids, max_new_tokens, eos_token_id, attention_mask)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config

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
        """Map a Hugging Face config.json dict onto ModelConfig (checkpoints.config_from_hf)."""
        from checkpoints import config_from_hf
        return config_from_hf(hf)

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
    """Preallocated keys/values k[layer], v[layer] (batch, n_kv_head, max_len, head_dim), filled
    together: a forward call of T tokens writes positions [length, length + T) of every row, then the
    model advances `length`; the caller owns the attention mask (B, length + T), 0 for (left) padding.
    Or row by row (continuous batching: a row whose text is done takes the next prompt): once
    `start_rows` gave rows a new sequence, row b writes at its own `row_lengths[b]`, and keys past a
    row's length are masked (no attention_mask). Beam search: `reorder(index)` keeps rows `index`
    (each surviving hypothesis's parent beam; an index may repeat a row)."""

    def __init__(self, n_layer, batch_size, n_kv_head, head_dim, max_len, dtype, device):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.length = 0
        self.row_lengths: torch.Tensor | None = None  # (B,) long, once filled row by row
        self._scratch = None  # one layer's buffer for in-place reorders, made on first use

    batch_size = property(lambda self: self.k[0].shape[0])
    max_len = property(lambda self: self.k[0].shape[2])

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
            self.k[layer][:, :, self.length:end], self.v[layer][:, :, self.length:end] = k, v
        else:  # row b's token t goes to position row_lengths[b] + t; under autocast k, v may be bf16
            rows, positions = torch.arange(k.shape[0], device=k.device)[:, None], self.positions(k.shape[2])
            dtype = self.k[layer].dtype
            self.k[layer][rows, :, positions] = k.transpose(1, 2).to(dtype)
            self.v[layer][rows, :, positions] = v.transpose(1, 2).to(dtype)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        """T new positions of every row are written (the model calls this after its last layer)."""
        self.length += T
        if self.row_lengths is not None:
            self.row_lengths += T

    def start_rows(self, rows, lengths, source: "KVCache | None" = None, source_rows=None) -> "KVCache":
        """Give each row rows[i] a new sequence of lengths[i] positions, copied from row source_rows[i]
        of `source` (a cache of the same model, e.g. a new prompt's prefill; lengths of 0 need none).
        From then on the cache is filled row by row."""
        device = self.k[0].device
        if self.row_lengths is None:
            self.row_lengths = torch.full((self.batch_size,), self.length, device=device)
        rows = torch.as_tensor(rows, device=device)
        if source is not None and source.length:
            n, source_rows = source.length, torch.as_tensor(source_rows, device=device)
            for mine, theirs in zip(self.k + self.v, source.k + source.v):
                mine[rows, :, :n] = theirs[source_rows, :, :n]  # past a row's length: masked, then overwritten
        self.row_lengths[rows] = torch.as_tensor(lengths, device=device)
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
            self.k, self.v = ([x.index_select(0, index) for x in xs] for xs in (self.k, self.v))
            self._scratch = None
            return self
        if self._scratch is None:
            self._scratch = torch.empty_like(self.k[0])
        part = slice(start, self.length)
        for buffer in self.k + self.v:  # gather into the scratch, copy back: no new allocation per step
            torch.index_select(buffer[:, :, part], 0, index, out=self._scratch[:, :, part])
            buffer[:, :, part] = self._scratch[:, :, part]
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
        cfg, ref = self.config, self.tok_emb.weight
        return KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, cfg.head_dim, max_len, dtype or ref.dtype,
                       device or ref.device)

    def _attention_mask(self, attention_mask, T, past, device, row_positions=None):
        """Boolean (B or 1, 1, T, past+T) mask of allowed keys, or None when SDPA's is_causal suffices.
        row_positions (B, T): each query's own position, for a cache filled row by row."""
        S, window = past + T, self.config.sliding_window
        windowed = window is not None and S > window
        if attention_mask is None and row_positions is None and (past == 0 or T == 1) and not windowed:
            return None
        if attention_mask is not None and attention_mask.shape[-1] != S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected cached + new = {S}")
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
        return allowed | (k_pos == q_pos)  # a padding query may see no key: seeing itself keeps the softmax finite

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        """Final-normed hidden states (B, T, d_model) for the new tokens `input_ids` (B, T).

        attention_mask: (B, cached + T) of 1 = token, 0 = padding. position_ids: (B, T); if None,
        cumsum(attention_mask) - 1 (left padding does not shift positions), or cached .. cached + T - 1
        without a mask. A cache filled row by row sets both itself."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        by_row = cache is not None and cache.row_lengths is not None
        if by_row and (attention_mask is not None or position_ids is not None):
            raise ValueError("a KV cache filled row by row (start_rows) sets the mask and positions itself: "
                             "pass no attention_mask or position_ids")
        if by_row:
            position_ids = cache.positions(T)
        elif position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        elif position_ids is None:
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
        """Returns (logits (B, T, vocab), loss or None). `targets` (B, T) are aligned with the logits:
        targets[:, t] is what logits[:, t] predicts (for language modelling, input_ids shifted left by
        one, ignore_index where there is nothing to predict); loss: mean fp32 cross-entropy over the rest."""
        logits = self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                                       label_smoothing=label_smoothing)

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
        """Greedy decoding with a KV cache; batched prompts LEFT-padded (with attention_mask). Returns
        (B, T + n) ids, n <= max_new_tokens; a row that emitted eos_token_id (int or list) is padded
        with that eos id until every row is done."""
        (B, T), mask = input_ids.shape, attention_mask  # None: no padding, and no mask to build at every step
        eos = None if eos_token_id is None else torch.tensor(eos_token_id, device=input_ids.device).flatten()
        cache, done = self.new_cache(B, T + max_new_tokens), torch.zeros(B, dtype=torch.bool, device=input_ids.device)
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


# ----------------------------------------------------------------------------- classification head
# GLUE on a decoder: under causal attention only the last real token has seen the whole sequence,
# so a linear head reads the hidden state there (as transformers' GPT2ForSequenceClassification).

def last_token_states(hidden, attention_mask):
    """(B, T, d) -> (B, d): each row's state at its last position with attention_mask 1 (from the
    mask, not a pad id: left or right padding, and models that pad with eos, as GPT-2 does)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = torch.where(attention_mask.bool(), positions, -1).amax(dim=1)
    if (last < 0).any():
        raise ValueError("a row of attention_mask is all zeros: every sequence needs at least one token")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class ClassificationHead(nn.Module):
    """num_labels scores from the last real token (1: a regression, e.g. STS-B). Beside the
    Transformer, not inside it, so adapters see the same module names with or without a head."""

    def __init__(self, d_model: int, num_labels: int):
        super().__init__()
        self.score = nn.Linear(d_model, num_labels)

    def forward(self, hidden, attention_mask):
        return self.score(last_token_states(hidden, attention_mask).to(self.score.weight.dtype))


# ----------------------------------------------------------------------------- load_pretrained

def load_pretrained(name_or_path, dtype=torch.float32, device="cpu"):
    """Load (model, tokenizer) from a local HF directory, a hub id, or a llama.cpp .gguf file.

    The model is built on the meta device and each checkpoint tensor is materialised once, directly
    in `dtype` on `device`; names and shapes must match exactly (no random init, no strict=False).
    The tokenizer is a `tokenizers.Tokenizer`, or None. A file that is missing, corrupt or of
    another model raises errors.CheckpointError, naming it and the fix."""
    from checkpoints import read_checkpoint, read_state_dict  # the file formats: a module of their own
    cfg, tensors, tokenizer, source = read_checkpoint(name_or_path)  # {our name: (name in file, shape, load)}
    with torch.device("meta"):
        model = Transformer(cfg)  # no memory and no random init: every tensor comes from the file
    model.load_state_dict(read_state_dict(model, tensors, source, dtype, device), strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the shared Parameter with two; share it again
    return model.eval(), tokenizer


# Names that moved to checkpoints.py / export.py still import from here, lazily (PEP 562).
_MOVED = {"CheckpointError": "errors", "SUPPORTED_MODEL_TYPES": "checkpoints", "byte_level_bpe": "checkpoints",
          "load_tokenizer": "checkpoints", "unpermute_qk": "checkpoints", "hf_config": "export",
          "hf_state_dict": "export", "peft_lora_weights": "export", "save_hf_checkpoint": "export",
          "save_peft_adapter": "export"}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(_MOVED[name]), name)
