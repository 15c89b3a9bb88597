"""Export against transformers and PEFT: model.save_hf_checkpoint, model.save_peft_adapter, kasa.lora_factors.

A fine-tuned model leaves as (a) a LoRA adapter of rank r + t that PEFT applies to the ORIGINAL,
untouched transformers model, and (b) a merged Hugging Face checkpoint that transformers loads.
Both must give our logits. Tiny random models, offline.
"""
import json

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import kasa
import model as M
import train
from test_model import tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_mistral():  # a LLaMA with a sliding window (8 < the 24 test tokens): exported as "mistral"
    cfg = transformers.MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                     max_position_embeddings=256, rope_theta=500.0, bos_token_id=1, eos_token_id=2)
    return transformers.MistralForCausalLM(cfg).eval()


def kasa_qv(model):
    kasa.apply_kasa(model, targets=("q_proj", "v_proj"), r=4, alpha=16)


def kasa_truncation_2_qkvo(model):  # t = 2 dropped triplets != r = 4: rank r + t = 6
    kasa.apply_kasa(model, targets=("q_proj", "k_proj", "v_proj", "o_proj"), r=4, alpha=8, truncation=2)


def pissa_qv(model):  # the moved top-r triplets are the "dropped" buffers: the same export
    train.adapt_model(model, train.TrainConfig(method="pissa", targets=("q_proj", "v_proj"), r=4,
                                               adapter_dropout=0.0))


def mixed_ranks(model):  # rank 7 on q, v everywhere, rank 4 on one o_proj: rank_pattern, full target names
    kasa.apply_kasa(model, targets=("q_proj", "v_proj"), r=4, alpha=16, truncation=3)
    kasa.apply_kasa(model, targets=("blocks.1.attn.o_proj",), r=2, alpha=4)


# case: (tiny transformers model, fine-tuning method, what adapter_config.json must say: r, rank_pattern,
# target_modules). The rank of a layer is r + t; GPT-2's c_attn adds up the ranks of its adapted q, k, v.
CASES = {
    "llama-gqa-kasa-qv": (tiny_llama, kasa_qv, (8, {}, ["q_proj", "v_proj"])),
    "llama-gqa-kasa-t2-qkvo": (tiny_llama, kasa_truncation_2_qkvo, (6, {}, ["k_proj", "o_proj", "q_proj", "v_proj"])),
    "llama-tied-pissa": (lambda: tiny_llama(tie=True), pissa_qv, (8, {}, ["q_proj", "v_proj"])),
    "llama-mixed-ranks": (tiny_llama, mixed_ranks, (7, {"model.layers.1.self_attn.o_proj": 4},
                                                    ["model.layers.1.self_attn.o_proj", "q_proj", "v_proj"])),
    "mistral-window-kasa-qv": (tiny_mistral, kasa_qv, (8, {}, ["q_proj", "v_proj"])),
    "gpt2-kasa-qv": (tiny_gpt2, kasa_qv, (16, {}, ["c_attn"])),
    "gpt2-kasa-t2-qkvo": (tiny_gpt2, kasa_truncation_2_qkvo,
                          (18, {"transformer.h.0.attn.c_proj": 6, "transformer.h.1.attn.c_proj": 6},
                           ["c_attn", "transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"])),
    "gpt2-pissa": (tiny_gpt2, pissa_qv, (16, {}, ["c_attn"])),
    "gpt2-mixed-ranks": (tiny_gpt2, mixed_ranks, (14, {"transformer.h.1.attn.c_proj": 4},
                                                  ["c_attn", "transformer.h.1.attn.c_proj"])),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """(ours, ids, our logits, original HF dir, adapter dir, merged dir, expected config) for one case."""
    torch.manual_seed(0)
    build, adapt, expected_config = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    build().save_pretrained(root / "original")
    ours, _ = M.load_pretrained(root / "original")
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        base_logits = ours(ids)[0]
    adapt(ours)
    with torch.no_grad():  # stand-in for training: move every trainable tensor (B starts at zero)
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        logits = ours(ids)[0]
    assert (logits - base_logits).abs().max() > 0.05, "the adapter must change the model, or the test proves nothing"
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    M.save_peft_adapter(ours, root / "peft", str(root / "original"))
    M.save_hf_checkpoint(ours, None, root / "merged")
    after = ours.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.merged for m in ours.modules() if isinstance(m, kasa.KaSALinear))
    return ours, ids, logits, root / "original", root / "peft", root / "merged", expected_config


def test_peft_loads_adapter_onto_original_model_and_matches_our_logits(exported):
    _, ids, logits, original, adapter, _, _ = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(original).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    # PEFT built the same LoRA tensors from adapter_config.json as our file holds: no key left out or extra.
    saved = safetensors.torch.load_file(adapter / "adapter_model.safetensors")
    built = peft.get_peft_model_state_dict(peft_model)
    assert {k: tuple(v.shape) for k, v in built.items()} == {k: tuple(v.shape) for k, v in saved.items()}
    lora_layers = [m for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert lora_layers and all(m.scaling["default"] == 1.0 for m in lora_layers)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, logits, atol=1e-4, rtol=0)


def test_transformers_and_load_pretrained_load_merged_checkpoint_with_our_logits(exported):
    _, ids, logits, _, _, merged, _ = exported
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded, _ = M.load_pretrained(merged)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(reloaded(ids)[0], logits, atol=1e-4, rtol=0)


def test_adapter_config_has_rank_r_plus_t_and_scaling_1(exported):
    ours, _, _, _, adapter, _, (r, rank_pattern, target_modules) = exported
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["rank_pattern"], config["target_modules"]) == (r, rank_pattern, target_modules)
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]
    assert config["peft_type"] == "LORA" and not config["use_rslora"] and config["bias"] == "none"
    assert config["fan_in_fan_out"] == (ours.config.family == "gpt2")


def test_lora_factors_reproduce_the_fine_tuned_weight_on_the_original_float64():
    torch.manual_seed(0)
    for truncation in (None, 0, 2, 5):  # t = r (the paper), no truncation (LoRA), t < r, t > r
        base = nn.Linear(24, 16, dtype=torch.float64)
        W = base.weight.detach().clone()
        layer = kasa.KaSALinear(base, r=3, alpha=6, truncation=truncation)
        with torch.no_grad():
            layer.kasa_B.normal_()
        B_total, A_total = kasa.lora_factors(layer)
        t = layer.kasa_dropped_Vt.shape[0]
        assert B_total.shape == (16, 3 + t) and A_total.shape == (3 + t, 24) and B_total.dtype == torch.float64
        fine_tuned = layer.weight + 2.0 * layer.kasa_B @ torch.diag(layer.kasa_sigma) @ layer.kasa_A
        torch.testing.assert_close(W + B_total @ A_total, fine_tuned.detach(), atol=1e-12, rtol=0)
        layer.merge()  # merged or not, the same factors
        torch.testing.assert_close(kasa.lora_factors(layer)[0], B_total, atol=0, rtol=0)


def test_tokenizer_is_saved_and_export_dir_is_replaced_atomically(tmp_path, monkeypatch):
    from tokenizers.pre_tokenizers import ByteLevel
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "original")
    ours, _ = M.load_pretrained(tmp_path / "original")
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()) + ["ab", "<|end|>"])}
    tokenizer = M.byte_level_bpe(vocab, [("a", "b")], ["<|end|>"])
    out = tmp_path / "export"
    M.save_hf_checkpoint(ours, tokenizer, out)
    _, tok = M.load_pretrained(out)
    assert tok.encode("ab a<|end|>b").ids == tokenizer.encode("ab a<|end|>b").ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "original"]  # no temp dir left behind

    # A failed export leaves the previous one untouched, and no temp dir.
    def disk_full(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        M.save_hf_checkpoint(ours, None, out)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "original"]

    # A second export replaces the first; a directory with other files in it is never replaced.
    M.save_hf_checkpoint(ours, None, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds other files \(notes.txt\)"):
        M.save_hf_checkpoint(ours, None, out)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="no KaSA layers"):
        M.save_peft_adapter(ours, tmp_path / "peft")
