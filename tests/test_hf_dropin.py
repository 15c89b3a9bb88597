"""kasa.py copied into a Hugging Face project: transformers' Llama and GPT-2 (Conv1D), against
float64 recomputation, PEFT's KaSA and our own GPT-2 (model.py). Tiny random configs, offline."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import kasa

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


MODELS = {"llama": (tiny_llama, ("q_proj", "v_proj")), "gpt2": (tiny_gpt2, ("c_attn", "attn.c_proj"))}


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def numpy_world(W: np.ndarray, r: int) -> np.ndarray:
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    return (U[:, :-r] * S[:-r]) @ Vt[:-r]


@pytest.mark.parametrize("kind", MODELS)
def test_train_merge_and_reload_a_transformers_model(kind, tmp_path, monkeypatch):
    save_file, load_file = pytest.importorskip("safetensors.torch").save_file, \
        pytest.importorskip("safetensors.torch").load_file
    make, targets = MODELS[kind]
    torch.manual_seed(0)
    model = make()
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    names = kasa.apply_kasa(model, targets=targets, r=4, alpha=8)
    assert len(names) == 4
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    input_ids = torch.randint(0, 96, (2, 12))
    model.train()
    for _ in range(3):
        l2, l3 = kasa.kasa_regularization(model)
        loss = model(input_ids=input_ids, labels=input_ids).loss + 1e-4 * l2 + 1e-3 * l3
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for name, param in model.named_parameters():
        is_adapter = name.rpartition(".")[2] in ("kasa_A", "kasa_B", "kasa_sigma")
        assert torch.equal(param, before[name]) != is_adapter, name      # only kasa_* moved
    unmerged = logits(model, input_ids)
    save_file(kasa.kasa_state_dict(model), tmp_path / "adapter.safetensors")
    kasa.merge_kasa(model)
    torch.testing.assert_close(logits(model, input_ids), unmerged, atol=1e-5, rtol=1e-5)

    def no_decomposition(*args, **kwargs):
        raise AssertionError("loading an adapter must not decompose a weight")
    for solver in ("svd", "eigh", "lu_factor_ex", "cholesky_ex"):
        monkeypatch.setattr(torch.linalg, solver, no_decomposition)
    fresh = make()
    fresh.load_state_dict(pretrained)
    assert kasa.load_kasa_state_dict(fresh, load_file(tmp_path / "adapter.safetensors")) == names
    torch.testing.assert_close(logits(fresh, input_ids), unmerged, atol=1e-6, rtol=1e-6)


def test_llama_equals_peft_kasa_with_the_same_factors():
    peft = pytest.importorskip("peft")
    if not hasattr(peft, "KasaConfig"):
        pytest.skip("this peft has no KaSA variant (needs peft >= 0.21)")
    torch.manual_seed(0)
    ours = tiny_llama()
    theirs = tiny_llama()
    theirs.load_state_dict(ours.state_dict())
    kasa.apply_kasa(ours, targets=("q_proj", "v_proj"), r=4, alpha=8)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         kasa_config=peft.KasaConfig()))
    for name, mine in ours.named_modules():
        if isinstance(mine, kasa.KaSALinear):
            mine.kasa_B.data.normal_(0, 0.3)
            other = theirs.base_model.model.get_submodule(name)
            torch.testing.assert_close(other.base_layer.weight, mine.weight, atol=1e-5, rtol=0)   # W_world
            with torch.no_grad():
                other.lora_A["default"].weight.copy_(mine.kasa_A)
                other.lora_B["default"].weight.copy_(mine.kasa_B)
                other.lora_diag["default"].copy_(mine.kasa_sigma)
    input_ids = torch.randint(0, 96, (2, 10))
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-4, rtol=1e-4)


def test_conv1d_against_float64_recomputation():
    torch.manual_seed(0)
    conv = Conv1D(48, 16).double()                        # GPT-2's c_attn shape: nf = 3 x 16 outputs, nx = 16
    nn.init.normal_(conv.bias)
    W, b = conv.weight.detach().T.numpy().copy(), conv.bias.detach().numpy().copy()   # W (out, in)
    assert kasa.is_conv1d(conv) and not kasa.is_conv1d(nn.Linear(16, 48))
    layer = kasa.KaSALinear(conv, r=3, alpha=6)
    assert layer.fan_in_fan_out and layer.weight.shape == (16, 48)                     # Conv1D's own layout
    np.testing.assert_allclose(layer.weight.detach().T.numpy(), numpy_world(W, 3), atol=1e-12)
    layer.kasa_B.data.normal_()
    A, B, s = (t.detach().numpy() for t in (layer.kasa_A, layer.kasa_B, layer.kasa_sigma))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    expected = x.numpy() @ (numpy_world(W, 3) + 2.0 * B @ np.diag(s) @ A).T + b
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, atol=1e-10)
    with torch.no_grad():
        layer.merge()
        np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-10)
        layer.unmerge()
        np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-10)
    restored = layer.restore_base()
    assert type(restored) is Conv1D and restored.weight.shape == conv.weight.shape
    torch.testing.assert_close(restored.weight, conv.weight, atol=1e-12, rtol=0)
    torch.testing.assert_close(restored(x), conv(x), atol=1e-12, rtol=0)


def test_conv1d_equals_our_gpt2_on_the_same_weights(tmp_path):
    """HF GPT-2's attn.c_proj (Conv1D) and model.py's o_proj (nn.Linear) hold the same matrix: KaSA gives
    both the same W_world, and with the same A, B, σ the same logits."""
    import model as our_model
    torch.manual_seed(0)
    hf = tiny_gpt2()
    hf.save_pretrained(tmp_path)
    ours = our_model.load_pretrained(tmp_path)[0]
    kasa.apply_kasa(hf, targets=("attn.c_proj",), r=4, alpha=8)
    kasa.apply_kasa(ours, targets=("o_proj",), r=4, alpha=8)
    for i in range(2):
        theirs, mine = hf.transformer.h[i].attn.c_proj, ours.blocks[i].attn.o_proj
        torch.testing.assert_close(theirs.weight_out_in(), mine.weight, atol=1e-6, rtol=0)
        theirs.kasa_B.data.normal_(0, 0.3)
        for p in ("kasa_A", "kasa_B", "kasa_sigma"):
            getattr(mine, p).data.copy_(getattr(theirs, p))
    input_ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids)[0], logits(hf, input_ids), atol=1e-4, rtol=1e-4)
