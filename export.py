"""Export: hand a fine-tuned model to other tools, in Hugging Face's layout.

    save_hf_checkpoint  the merged weights W_world + ΔW (zero added latency), for transformers'
                        from_pretrained and for model.load_pretrained;
    save_peft_adapter   a plain LoRA adapter of rank r + t for the ORIGINAL, untouched base
                        (kasa.lora_factors), for peft.PeftModel.from_pretrained or any LoRA server.

Names go back through checkpoints.MODULE_NAMES (the table loading reads the other way); GPT-2's
q/k/v are fused back into one Conv1D c_attn, whose weight is stored (in, out). Each export is
written into a fresh directory that replaces out_dir only when complete (files.write_dir_atomic).
This module imports kasa and model; neither imports it.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

import kasa
from checkpoints import GPT2_FUSED, rename
from errors import ConfigError
from files import write_dir_atomic
from model import ModelConfig, Transformer


def _hf_module(cfg: ModelConfig, name: str) -> tuple[str, int, int]:
    """Our module name -> (HF module name, its row block there, the number of row blocks).

    Every module is one block of its own, except GPT-2's q/k/v: blocks 0, 1, 2 of c_attn."""
    block_of, _, proj = name.rpartition(".")
    if cfg.family == "gpt2" and proj in GPT2_FUSED:
        return rename(cfg, block_of + ".c_attn", to_hf=True), GPT2_FUSED.index(proj), len(GPT2_FUSED)
    return rename(cfg, name, to_hf=True), 0, 1


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
            raise ConfigError("this gpt2-family model has no GPT-2 config.json: GPT-2 needs n_kv_head == n_head, "
                              "head_dim == d_model / n_head, biases on every linear layer and a gelu activation")
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=cfg.d_model, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, n_inner=cfg.d_ff, n_positions=cfg.max_position,
                    layer_norm_epsilon=cfg.norm_eps,
                    activation_function={"gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.activation], **common)
    # A LLaMA with a sliding window is a Mistral to transformers (LlamaConfig has no window).
    model_type = "mistral" if cfg.sliding_window else "llama"
    if cfg.activation != "silu" or (model_type == "mistral" and (cfg.attn_bias or cfg.mlp_bias)):
        raise ConfigError(f"this llama-family model has no {model_type} config.json: it needs the SwiGLU (silu) "
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
        raise ConfigError("lm_head is no longer tied to the embedding (was it adapted?), but the config says "
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
        raise ConfigError("the model has no KaSA layers, so there is no adapter to export: "
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


def save_hf_checkpoint(model: Transformer, tokenizer, out_dir):
    """Write the model, KaSA layers merged, as a Hugging Face checkpoint directory:

        config.json, model.safetensors (HF names, a tied lm_head left out), tokenizer.json (if given)

    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_pretrained(out_dir) read it.
    Weights keep the model's dtype. The model is not changed (nothing is merged in place)."""
    from safetensors.torch import save_file
    config, state = hf_config(model.config, model.tok_emb.weight.dtype), hf_state_dict(model)

    def write(directory: Path):
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})  # transformers checks it
        if tokenizer is not None:
            tokenizer.save(str(directory / "tokenizer.json"))
    write_dir_atomic(out_dir, ("config.json", "model.safetensors", "tokenizer.json"), write)


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
        (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_dir_atomic(out_dir, ("adapter_config.json", "adapter_model.safetensors"), write)
