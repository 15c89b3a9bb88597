"""model.py against transformers on tiny random models, plus loaders, tokenizers and errors. Offline."""
import json

import numpy as np
import pytest
import torch

import model as M

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TEXTS = ["Hello world", "  leading spaces and\ttabs\n\nnewlines\r\n", "naïve café — 日本語 🤖 emoji",
         "it's 1234 numbers, don't they'll", "<|endoftext|>special then text", "a" * 50 + " " * 5 + "end"]


def tiny_llama(tie=False, kv_heads=2, rope_scaling=None, bias=False, d_ff=112):
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=d_ff, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500.0,
        rope_scaling=rope_scaling, tie_word_embeddings=tie, attention_bias=bias, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def save(hf_model, path, how="safetensors"):
    if how == "bin":  # transformers 5 always writes safetensors, so write the legacy format by hand
        hf_model.config.save_pretrained(path)
        torch.save(hf_model.state_dict(), path / "pytorch_model.bin")
    elif how == "bin-unprefixed":  # as the original gpt2 hub checkpoint: GPT2Model's names, no lm_head
        hf_model.config.save_pretrained(path)
        torch.save({k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()
                    if not k.startswith("lm_head.")}, path / "pytorch_model.bin")
    else:
        hf_model.save_pretrained(path, max_shard_size="40KB" if how == "sharded" else "5GB")
    return path


CASES = {
    "gpt2": (tiny_gpt2, "safetensors"),
    "gpt2-bin": (tiny_gpt2, "bin"),
    "gpt2-bin-unprefixed": (tiny_gpt2, "bin-unprefixed"),
    "llama-gqa-untied": (lambda: tiny_llama(), "safetensors"),
    "llama-tied-sharded": (lambda: tiny_llama(tie=True, kv_heads=4), "sharded"),
    "llama3-rope-bias-bin": (lambda: tiny_llama(kv_heads=1, rope_scaling=LLAMA3_ROPE, bias=True), "bin"),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    build, how = CASES[request.param]
    hf = build()
    path = save(hf, tmp_path_factory.mktemp(request.param), how)
    ours, tok = M.load_pretrained(path)
    assert tok is None
    return request.param, hf, ours, path


def test_logits_and_loss_match_transformers(pair):
    name, hf, ours, path = pair
    if "sharded" in name:
        assert (path / "model.safetensors.index.json").exists()
    if "-tied" in name or name.startswith("gpt2"):
        assert ours.lm_head.weight is ours.tok_emb.weight
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        ref = hf(ids, labels=ids)
        logits, loss = ours(ids, targets=torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1))
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=0)
    assert ours(ids)[1] is None


def test_greedy_generate_matches_transformers(pair):
    _, hf, ours, _ = pair
    ids = torch.randint(3, 96, (2, 7))
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids, max_new_tokens=12), ref)


def test_kv_cache_equals_full_recompute(pair):
    _, _, ours, _ = pair
    ids = torch.randint(0, 96, (3, 20))
    with torch.no_grad():
        full, _ = ours(ids)
        cache = ours.new_cache(3, 20)
        chunks = [ours(ids[:, a:b], cache=cache)[0] for a, b in [(0, 8), (8, 9), (9, 15), (15, 20)]]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=0)


def test_left_padded_batch_equals_unpadded_rows(pair):
    _, _, ours, _ = pair
    rows = [torch.randint(3, 96, (n,)) for n in (9, 5, 2)]
    T = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(T - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(T - len(r)), torch.ones(len(r))]).long() for r in rows])
    with torch.no_grad():
        batched, _ = ours(ids, attention_mask=mask)
        hidden = ours.hidden_states(ids, attention_mask=mask)
        out = ours.generate(ids, max_new_tokens=6, attention_mask=mask)
        for i, r in enumerate(rows):
            single, _ = ours(r[None])
            torch.testing.assert_close(batched[i, T - len(r):], single[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(hidden[i, -1], ours.hidden_states(r[None])[0, -1], atol=1e-5, rtol=0)
            assert torch.equal(out[i, T:], ours.generate(r[None], max_new_tokens=6)[0, len(r):])


def test_cache_reorder_into_beams_then_between_them():
    torch.manual_seed(0)
    model = M.Transformer(M.ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48)).eval()
    ids = torch.randint(0, 50, (2, 6))
    nxt = torch.randint(0, 50, (4, 1))
    with torch.no_grad():
        cache = model.new_cache(2, 8)
        model(ids, cache=cache)
        cache.reorder(torch.tensor([0, 0, 1, 1])).reorder(torch.tensor([1, 0, 3, 2]))  # 2 beams a row; swap each pair
        stepped, _ = model(nxt, cache=cache)
        beams = ids.repeat_interleave(2, 0)[[1, 0, 3, 2]]
        full, _ = model(torch.cat([beams, nxt], 1))
    torch.testing.assert_close(stepped[:, -1], full[:, -1], atol=1e-5, rtol=0)


def test_training_step_runs_with_dropout():
    model = M.Transformer(M.ModelConfig(family="gpt2", vocab_size=50, n_layer=1, n_head=2, d_model=16,
                                        max_position=16, dropout=0.1, tie_embeddings=True)).train()
    ids = torch.randint(0, 50, (2, 8))
    _, loss = model(ids, targets=ids, label_smoothing=0.1)
    loss.backward()
    assert model.tok_emb.weight.grad is not None and torch.isfinite(loss)


# ----------------------------------------------------------------------------- GGUF

def permute_like_llama_cpp(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_quantized_llama_matches_dequantized_reference(tmp_path):
    gguf = pytest.importorskip("gguf")
    from tokenizers.pre_tokenizers import ByteLevel
    Q = gguf.GGMLQuantizationType
    byte_chars = sorted(ByteLevel.alphabet())
    tokens = byte_chars + ["ab", "Ġa", "<|end|>"]
    torch.manual_seed(0)
    hf = tiny_llama(tie=True, kv_heads=2, d_ff=128)  # GGUF quantises rows in blocks of 32
    hf.resize_token_embeddings(len(tokens))
    hf.config.rope_theta = 500.0
    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    c = hf.config
    w.add_block_count(c.num_hidden_layers); w.add_context_length(256); w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size); w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads); w.add_rope_freq_base(500.0); w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("gpt2"); w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3]); w.add_token_merges(["a b", "Ġ a"])
    w.add_bos_token_id(len(tokens) - 1); w.add_eos_token_id(len(tokens) - 1)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    reference = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        a = t.numpy()
        if name.startswith("model.layers."):
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:])
            gg = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                  "post_attention_layernorm": "ffn_norm"}[rest.rsplit(".", 1)[0]]
            gg_name = f"blk.{i}.{gg}.weight"
        else:
            gg_name = names[name]
        if a.ndim == 1:
            w.add_tensor(gg_name, a.astype(np.float32))
            reference[name] = t
            continue
        qtype = Q.Q8_0 if "embed" in name or "attn_v" in gg_name else Q.Q4_1
        heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}.get(gg_name.split(".")[2] if gg_name.startswith("blk") else "")
        stored = permute_like_llama_cpp(a, heads) if heads else a
        data = gguf.quants.quantize(stored, qtype)
        w.add_tensor(gg_name, data, raw_shape=data.shape, raw_dtype=qtype)
        # Quantisation blocks run along rows, so dequant(quant(W)) is the same with or without the row permutation.
        reference[name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype).copy())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    hf.load_state_dict(reference, strict=False)  # lm_head is tied to the embedding
    ours, tok = M.load_pretrained(tmp_path / "tiny.gguf")
    assert ours.config.tie_embeddings and ours.config.n_kv_head == 2 and ours.config.vocab_size == len(tokens)
    ids = torch.randint(0, len(tokens), (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf(ids).logits, atol=1e-4, rtol=0)
    enc = tok.encode("ab a<|end|>b")
    assert enc.tokens == ["ab", "Ġa", "<|end|>", "b"] and tok.decode(enc.ids, skip_special_tokens=False) == "ab a<|end|>b"


# ----------------------------------------------------------------------------- tokenizer

def test_gpt2_tokenizer_from_vocab_and_merges_equals_tokenizer_json(shared_data, tmp_path):
    from tokenizers import Tokenizer
    src = shared_data / "gpt2-tokenizer"
    for f in ("vocab.json", "vocab.bpe"):
        (tmp_path / f).write_bytes((src / f).read_bytes())
    built = M.load_tokenizer(tmp_path)
    reference = Tokenizer.from_file(str(src / "tokenizer.json"))
    for text in TEXTS:
        ids = built.encode(text).ids
        assert ids == reference.encode(text).ids, text
        assert built.decode(ids, skip_special_tokens=False) == text
    assert built.encode("<|endoftext|>").ids == [50256]


# ----------------------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save(tiny_llama(), tmp_path_factory.mktemp("llama"))


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_error_bad_path():
    with pytest.raises(FileNotFoundError, match="no such file"):
        M.load_pretrained("/no/such/model_dir")


def test_error_unknown_architecture(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture.*bert.*Supported.*llama"):
        M.load_pretrained(d)


def test_error_missing_tensor_and_wrong_shape(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    sd = load_file(llama_dir / "model.safetensors")
    d = _copy(llama_dir, tmp_path / "m")
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}, d / "model.safetensors")
    with pytest.raises(M.CheckpointError, match=r"missing tensors: \['blocks.1.mlp.up_proj.weight'\]"):
        M.load_pretrained(d)
    save_file({**sd, "model.norm.weight": torch.ones(65), "extra.weight": torch.ones(1)}, d / "model.safetensors")
    with pytest.raises(M.CheckpointError, match=r"(?s)unexpected tensors: \['extra.weight'\].*model.norm.weight: checkpoint \(65,\)"):
        M.load_pretrained(d)


def test_error_corrupt_file(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(M.CheckpointError, match="corrupt or truncated"):
        M.load_pretrained(d)


def test_error_hub_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub
    def offline(*a, **k):
        raise ConnectionError("offline")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="hub may be unreachable"):
        M.load_pretrained("someone/some-model")


def test_loss_method_equals_forward_loss():
    """model.loss (lm_head only where there is a target) gives forward's loss and gradients."""
    torch.manual_seed(0)
    model = M.Transformer(M.ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48)).double()
    ids = torch.randint(0, 50, (3, 10))
    targets = ids.roll(-1, 1)
    targets[:, :4] = targets[:, -1] = -100  # context and last position: no target
    targets[1, 7:] = -100
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    params = list(model.parameters())
    full = model(ids, targets, attention_mask=mask, label_smoothing=0.1)[1]
    fast = model.loss(ids, targets, attention_mask=mask, label_smoothing=0.1)
    torch.testing.assert_close(fast, full, atol=1e-12, rtol=0)
    for g_fast, g_full in zip(torch.autograd.grad(fast, params), torch.autograd.grad(full, params)):
        torch.testing.assert_close(g_fast, g_full, atol=1e-12, rtol=0)
