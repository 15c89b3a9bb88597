"""Bad model files give errors.CheckpointError naming the file and the problem, never a traceback
from deep inside a library, and a malicious pickle never runs. Offline, tiny models.

Each case copies a good checkpoint (a Hugging Face directory with model.safetensors or
pytorch_model.bin, or a .gguf file, all written here from tiny random models) into tmp_path, breaks
one thing, and loads it with model.load_pretrained.
"""
import json
import pickle
import shutil
import struct

import pytest
import torch

import errors
import export
import model as M


class CreatesFile:
    """A pickle payload: unpickling it calls open(path, "w"), which creates `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def tiny(family="llama", tie=False):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = M.ModelConfig(family="gpt2", vocab_size=32, n_layer=1, n_head=2, d_model=16, max_position=16,
                            activation="gelu_tanh", tie_embeddings=True, attn_bias=True, mlp_bias=True)
    else:
        cfg = M.ModelConfig(vocab_size=32, n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=32, max_position=64,
                            tie_embeddings=tie)
    return M.Transformer(cfg).eval()


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_gguf(path, ours, architecture="llama"):
    gguf = pytest.importorskip("gguf")
    c = ours.config
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(c.n_layer); w.add_context_length(c.max_position); w.add_embedding_length(c.d_model)
    w.add_feed_forward_length(c.d_ff); w.add_head_count(c.n_head); w.add_head_count_kv(c.n_kv_head)
    w.add_rope_freq_base(c.rope_theta); w.add_layer_norm_rms_eps(c.norm_eps)
    for name, t in export.hf_state_dict(ours).items():
        if name.startswith("model.layers."):
            parts = name.split(".")
            name = f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]
        w.add_tensor(name, t.float().numpy())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Good checkpoints: {"llama": dir, "gpt2": dir, "bin": dir with pytorch_model.bin, "gguf": file}."""
    root = tmp_path_factory.mktemp("good")
    export.save_hf_checkpoint(tiny(), None, root / "llama")
    export.save_hf_checkpoint(tiny("gpt2"), None, root / "gpt2")
    (root / "bin").mkdir()
    shutil.copy(root / "llama" / "config.json", root / "bin" / "config.json")
    torch.save(export.hf_state_dict(tiny()), root / "bin" / "pytorch_model.bin")
    return {"llama": root / "llama", "gpt2": root / "gpt2", "bin": root / "bin",
            "gguf": write_gguf(root / "tiny.gguf", tiny(tie=True))}


def test_the_good_checkpoints_load(good):
    """The cases below break one thing each in these files, which load as they are."""
    for kind, path in good.items():
        ours, _ = M.load_pretrained(path)
        reference = tiny(tie=kind == "gguf") if kind != "gpt2" else tiny("gpt2")
        if kind != "gguf":  # the GGUF stores q/k rows as written here, not in llama.cpp's permuted order
            ids = torch.randint(0, 32, (1, 8))
            with torch.no_grad():
                torch.testing.assert_close(ours(ids)[0], reference(ids)[0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- how to break a file
# Each maker(good, tmp, monkeypatch) returns (what to load, the file the message must name).

def copy(good, kind, tmp):
    if good[kind].is_file():
        return shutil.copy(good[kind], tmp / good[kind].name)
    return shutil.copytree(good[kind], tmp / kind)


def replaced(kind, name, data: bytes, **other_files: bytes):
    """`name` (and other_files) in a copy of good[kind] written with these bytes."""
    def make(good, tmp, monkeypatch):
        d = copy(good, kind, tmp)
        for file_name, content in {**other_files, name: data}.items():
            (d / file_name).write_bytes(content)
        return d, d / name
    return make


def truncated(kind, name, keep):
    """The first keep(size) bytes of `name` in a copy of good[kind] ("" for a .gguf: the file itself)."""
    def make(good, tmp, monkeypatch):
        d = copy(good, kind, tmp)
        target = d / name if name else d
        data = target.read_bytes()
        target.write_bytes(data[:keep(len(data))])
        return d, target
    return make


def edited_config(change, kind="llama"):
    def make(good, tmp, monkeypatch):
        d = copy(good, kind, tmp)
        config = json.loads((d / "config.json").read_text())
        change(config)
        (d / "config.json").write_text(json.dumps(config))
        return d, d / "config.json"
    return make


def drop(key):
    return lambda config: config.pop(key)


def setting(**values):
    return lambda config: config.update(values)


def edited_state(change, kind="llama"):
    def make(good, tmp, monkeypatch):
        from safetensors.torch import load_file, save_file
        d = copy(good, kind, tmp)
        state = load_file(d / "model.safetensors")
        change(state)
        save_file(state, d / "model.safetensors")
        return d, d / "model.safetensors"
    return make


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def pickled(good, tmp, obj, how="torch.save"):
    d = copy(good, "bin", tmp)
    if how == "torch.save":
        torch.save(obj, d / "pytorch_model.bin")
    else:
        (d / "pytorch_model.bin").write_bytes(pickle.dumps(obj, protocol=2))  # the protocol torch.load reads
    return d, d / "pytorch_model.bin"


def offline_hub(good, tmp, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    return "someone/some-model", "someone/some-model"


def weights_file_alone(good, tmp, monkeypatch):
    path = copy(good, "llama", tmp) / "model.safetensors"
    return path, path


def empty_dir(good, tmp, monkeypatch):
    (tmp / "empty").mkdir()
    return tmp / "empty", tmp / "empty"


def no_weights(good, tmp, monkeypatch):
    d = copy(good, "llama", tmp)
    (d / "model.safetensors").unlink()
    return d, d


def config_is_a_directory(good, tmp, monkeypatch):
    d = copy(good, "llama", tmp)
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    return d, d / "config.json"


def gguf_type_999(good, tmp, monkeypatch):
    """The ggml type of output_norm.weight (the u32 after its name, n_dims and its one dim) set to 999."""
    path = copy(good, "gguf", tmp)
    data = bytearray(path.read_bytes())
    name = b"output_norm.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 8
    data[at:at + 4] = struct.pack("<I", 999)
    path.write_bytes(bytes(data))
    return path, path


def gguf_bad_magic(good, tmp, monkeypatch):
    path = copy(good, "gguf", tmp)
    path.write_bytes(b"GGUX" + path.read_bytes()[4:])
    return path, path


def gguf_other_architecture(good, tmp, monkeypatch):
    path = write_gguf(tmp / "gpt2.gguf", tiny(tie=True), architecture="gpt2")
    return path, path


def c_attn_of_the_wrong_height(state):
    state["transformer.h.0.attn.c_attn.weight"] = torch.ones(16, 40)  # 40 rows: not 3 x n_embd = 48


INDEX = "model.safetensors.index.json"
ST = "model.safetensors"
BIN = "pytorch_model.bin"

# name: (maker, a keyword of the problem, matched as a regex against the error message)
CASES = {
    # where the checkpoint is
    "no such path": (lambda g, t, m: (t / "nowhere" / "model", "nowhere"), "no such file or directory"),
    "hub id, no network": (offline_hub, "hub may be unreachable"),
    "a weights file, not its directory": (weights_file_alone, "neither a model directory nor a .gguf"),
    "empty directory": (empty_dir, "has no config.json"),
    "config.json, no weights": (no_weights, "no weights in"),
    "index lists a missing shard": (replaced("llama", INDEX, b'{"weight_map": {"model.norm.weight": "b.safetensors"}}'),
                                    "b.safetensors is missing.*lists it as a shard"),
    "index not JSON": (replaced("llama", INDEX, b"{weight"), "not valid JSON"),
    "index without weight_map": (replaced("llama", INDEX, b"{}"), "no weight_map"),
    # config.json
    "config not JSON": (replaced("llama", "config.json", b'{"model_type": "llama",'), "not valid JSON"),
    "config not UTF-8": (replaced("llama", "config.json", b'{"model_type": "\xff"}'), "not UTF-8"),
    "config a JSON list": (replaced("llama", "config.json", b"[1, 2]"), "JSON list"),
    "config a directory": (config_is_a_directory, "is a directory"),
    "config lacks a key": (edited_config(drop("hidden_size")), r"lacks \['hidden_size'\]"),
    "gpt2 config lacks a key": (edited_config(drop("n_embd"), "gpt2"), r"lacks \['n_embd'\]"),
    "unsupported model_type": (edited_config(setting(model_type="bert")), "unsupported architecture.*bert"),
    "no model_type": (edited_config(drop("model_type")), "unsupported architecture: model_type=None"),
    "zero heads": (edited_config(setting(num_attention_heads=0)), "num_attention_heads=0.*positive integer"),
    "layers as text": (edited_config(setting(num_hidden_layers="2")), "num_hidden_layers='2'.*positive integer"),
    "heads not a multiple of kv heads": (edited_config(setting(num_key_value_heads=3)), "multiple of n_kv_head"),
    "unsupported activation": (edited_config(setting(hidden_act="relu")), "unsupported hidden_act 'relu'"),
    "unsupported rope": (edited_config(setting(rope_scaling={"rope_type": "yarn"})), "unsupported RoPE.*yarn"),
    "llama3 rope lacks keys": (edited_config(setting(rope_scaling={"rope_type": "llama3", "factor": 8.0})),
                               "needs.*low_freq_factor"),
    "config of another size": (edited_config(setting(num_hidden_layers=3)), r"missing tensors: \[.*'blocks\.2\."),
    # tokenizer files
    "tokenizer.json corrupt": (replaced("llama", "tokenizer.json", b'{"model": {"type": "BPE"'), "corrupt"),
    "vocab.json corrupt": (replaced("llama", "vocab.json", b"{", **{"merges.txt": b"a b\n"}), "not valid JSON"),
    "merges line of three tokens": (replaced("llama", "merges.txt", b"#version: 0.2\na b c\n",
                                             **{"vocab.json": b'{"a": 0, "b": 1}'}), "line 2.*two tokens"),
    "merge of unknown tokens": (replaced("llama", "merges.txt", b"a zz\n", **{"vocab.json": b'{"a": 0, "b": 1}'}),
                                "out of vocabulary"),
    # model.safetensors
    "safetensors empty": (replaced("llama", ST, b""), "fewer than the 8"),
    "safetensors header length past the end": (replaced("llama", ST, struct.pack("<Q", 1 << 40) + b"{}"),
                                               "header length"),
    "safetensors header not JSON": (replaced("llama", ST, struct.pack("<Q", 5) + b"{abc}"), "header is not JSON"),
    "safetensors header a list": (replaced("llama", ST, safetensors_bytes([1])), "not a JSON object"),
    "safetensors truncated": (truncated("llama", ST, lambda n: n // 2), "corrupt or truncated"),
    "safetensors entry without shape": (replaced("llama", ST, safetensors_bytes(
        {"w": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4)), "not dtype, shape and data_offsets"),
    "safetensors negative offset": (replaced("llama", ST, safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4)), "not dtype, shape"),
    "safetensors unknown dtype": (replaced("llama", ST, safetensors_bytes(
        {"w": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0")), "dtype F8_E4M3"),
    "safetensors bytes do not hold the shape": (replaced("llama", ST, safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4)), "do not hold shape"),
    # names and shapes
    "tensor missing": (edited_state(lambda s: s.pop("model.layers.1.mlp.up_proj.weight")),
                       r"missing tensors: \['blocks.1.mlp.up_proj.weight'\]"),
    "tensor unexpected": (edited_state(lambda s: s.update(extra=torch.ones(1))), r"unexpected tensors: \['extra'\]"),
    "tensor of the wrong shape": (edited_state(lambda s: s.update({"model.norm.weight": torch.ones(33)})),
                                  r"wrong shapes: \['model.norm.weight: checkpoint \(33,\) vs model \(32,\)'\]"),
    "gpt2 fused c_attn of the wrong height": (edited_state(c_attn_of_the_wrong_height, "gpt2"),
                                              "c_attn.weight has shape .*needs 48 rows"),
    # pytorch_model.bin
    "bin empty": (replaced("bin", BIN, b""), "is empty"),
    "bin truncated": (truncated("bin", BIN, lambda n: n // 2), "corrupt.*truncated"),
    "bin junk": (replaced("bin", BIN, b"not a checkpoint at all"), "corrupt.*truncated"),
    "bin a list of tensors": (lambda g, t, m: pickled(g, t, [torch.ones(1)]), "not a state dict"),
    # GGUF
    "gguf bad magic": (gguf_bad_magic, "not a GGUF"),
    "gguf empty": (truncated("gguf", "", lambda n: 0), "corrupt or truncated"),
    "gguf truncated header": (truncated("gguf", "", lambda n: 100), "corrupt or truncated"),
    "gguf truncated data": (truncated("gguf", "", lambda n: n - 64), "corrupt or truncated"),
    "gguf unknown tensor type": (gguf_type_999, "output_norm.weight has ggml type 999.*cannot dequantize"),
    "gguf other architecture": (gguf_other_architecture, "unsupported GGUF architecture 'gpt2'"),
}



@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_a_checkpoint_error_naming_the_file_and_the_problem(case, good, tmp_path, monkeypatch):
    make, keyword = CASES[case]
    path, named = make(good, tmp_path, monkeypatch)
    with pytest.raises(errors.CheckpointError, match=f"(?s){keyword}") as caught:
        M.load_pretrained(path)
    assert M.CheckpointError is errors.CheckpointError
    assert str(getattr(named, "name", named)) in str(caught.value)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(how, good, tmp_path):
    proof, target = tmp_path / "proof", tmp_path / "created-by-the-payload"
    pickle.loads(pickle.dumps(CreatesFile(proof))).close()
    assert proof.exists(), "the payload must work when unpickled unsafely, or this test proves nothing"
    path, named = pickled(good, tmp_path, {"model.norm.weight": torch.ones(32), "x": CreatesFile(target)}, how)
    with pytest.raises(errors.CheckpointError, match="refused it, and nothing in it ran") as caught:
        M.load_pretrained(path)
    assert named.name in str(caught.value)
    assert not target.exists()


def test_missing_path_and_offline_hub_are_also_file_not_found_errors(tmp_path, monkeypatch, good):
    """Code that caught the FileNotFoundError / OSError these raised before still catches them."""
    with pytest.raises(FileNotFoundError, match="no such file"):
        M.load_pretrained(tmp_path / "nowhere")
    offline_hub(good, tmp_path, monkeypatch)
    with pytest.raises(OSError, match="hub may be unreachable"):
        M.load_pretrained("someone/some-model")
