"""Checkpoint formats: from files on disk (or a hub id) to a ModelConfig and its tensors.

model.load_pretrained calls read_checkpoint and read_state_dict, and needs nothing else from here; a
reader of the tutorial may skip this file. In order:

  1. finding the checkpoint: a local directory, a .gguf file, or a Hugging Face hub id;
  2. config.json -> ModelConfig (config_from_hf);
  3. tensor readers: .safetensors (one file or shards with an index) and pytorch_model.bin;
  4. the HF <-> our name tables (export.py uses them too), and the conversion of a file's tensors;
  5. llama.cpp's GGUF: header, config, dequantization;
  6. tokenizers: tokenizer.json, vocab.json + merges.txt, or rebuilt from a GGUF vocabulary.

Every reader returns {name in the file: (shape, load)} where load(dtype) materialises that one
tensor, in `dtype`, on the CPU. Names and shapes are checked before any weight is read, and weights
are read one at a time, so loading holds the model plus at most one tensor in the file's format.
Files are read with plain reads, not memory-mapped: the pages of a mapped file count as the
process's memory for as long as the mapping lives, so casting a mapped bf16 file to fp32 would hold
the whole file and the whole fp32 model at once.

Whatever a file can do wrong (missing, truncated, corrupt, a pickle that would run code, a config
of another model) raises errors.CheckpointError naming the file and the fix.
"""
from __future__ import annotations

import errno
import functools
import json
import math
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

from errors import CheckpointError, reading
from model import ModelConfig

REDOWNLOAD = "re-download the model"


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No such file or directory, or a hub id that cannot be downloaded. A FileNotFoundError too."""


# ----------------------------------------------------------------------------- 1. finding the checkpoint

def resolve(name_or_path: str) -> Path:
    """A local file or directory as it is; anything else that looks like a hub id, downloaded."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    looks_like_path = (path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
                       or path.suffix in (".gguf", ".safetensors", ".bin", ".json"))
    if looks_like_path:
        raise CheckpointNotFound(f"no such file or directory: {name_or_path!r}; pass a model directory with "
                                 "config.json, a .gguf file, or a hub id like 'gpt2' or 'HuggingFaceTB/SmolLM2-135M'")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "vocab.json", "merges.txt"]))
    except Exception as e:  # noqa: BLE001 - no network, no such repository, no huggingface_hub, ...
        raise CheckpointNotFound(
            f"could not download {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}), "
            f"and there is no local file or directory of that name. The hub may be unreachable or the id "
            "misspelt: pass a local model directory or a .gguf file instead.") from e


def read_checkpoint(name_or_path):
    """(ModelConfig, {our name: (name in the file, shape, load(dtype))}, tokenizer or None, the weights
    file(s) read, to name in errors)."""
    path = source = resolve(str(name_or_path))
    if path.is_dir():
        cfg = read_hf_config(path / "config.json")
        (tensors, source), tokenizer = read_hf_weights(path), load_tokenizer(path)
    elif path.suffix == ".gguf":
        cfg, tensors, tokenizer = read_gguf(path)
    else:
        raise CheckpointError(f"{path} is neither a model directory nor a .gguf file: pass the directory that "
                              "holds config.json and the weights, or a llama.cpp .gguf file")
    return cfg, convert(cfg, tensors, source), tokenizer, source


def check_tensors(source, expected: dict, tensors: dict):
    """Raise a CheckpointError naming every tensor that is missing, unexpected or of the wrong shape.

    expected: {our name: shape} of the model; tensors: read_checkpoint's {our name: (name in file, shape, load)}."""
    def listed(names):  # a model of another size can miss hundreds
        return str(names) if len(names) <= 12 else f"{str(names[:12])[:-1]}, ... ({len(names)} in all)]"
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(file_name for name, (file_name, _, _) in tensors.items() if name not in expected)
    wrong_shape = [f"{file_name}: checkpoint {shape} vs model {expected[name]}"
                   for name, (file_name, shape, _) in tensors.items() if name in expected and shape != expected[name]]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(f"{source}: the checkpoint does not match the model config:"
                              + (f"\n  missing tensors: {listed(missing)}" if missing else "")
                              + (f"\n  unexpected tensors: {listed(unexpected)}" if unexpected else "")
                              + (f"\n  wrong shapes: {listed(wrong_shape)}" if wrong_shape else "")
                              + f"\nCheck that config.json belongs to these weights, or {REDOWNLOAD}.")


def read_state_dict(model, tensors: dict, source, dtype, device) -> dict:
    """The state dict of `model` (a Transformer on the meta device) from read_checkpoint's tensors:
    every name and shape checked before any weight is read, then each tensor read once, straight
    into `dtype` on `device`. A tied lm_head is tok_emb's tensor, not one of the file's."""
    tied = model.config.tie_embeddings
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()
                if not (tied and name == "lm_head.weight")}
    check_tensors(source, expected, tensors)
    state = {}
    for name, (file_name, _, load) in tensors.items():
        state[name] = load(dtype).to(device).contiguous()
        assert tuple(state[name].shape) == expected[name], f"{file_name} -> {name}: {tuple(state[name].shape)}"
    if tied:
        state["lm_head.weight"] = state["tok_emb.weight"]
    return state


# ----------------------------------------------------------------------------- 2. config.json

SUPPORTED_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama"}
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _check_sizes(values: dict, required: tuple, optional: tuple = ()):
    """Every required key present and every size a positive integer, or an error that names the key."""
    missing = [key for key in required if key not in values]
    if missing:
        raise CheckpointError(f"it lacks {missing}")
    for key in required + tuple(k for k in optional if values.get(k) is not None):
        if type(values[key]) is not int or values[key] <= 0:
            raise CheckpointError(f"{key}={values[key]!r}: it must be a positive integer")


def config_from_hf(hf: dict) -> ModelConfig:
    """Map a Hugging Face config.json dict onto ModelConfig."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"unsupported architecture: model_type={model_type!r}, architectures={hf.get('architectures')}. "
            f"Supported model_type values: {sorted(SUPPORTED_MODEL_TYPES)} "
            "(GPT-2; Llama 2/3, TinyLlama and SmolLM2 are 'llama'; Mistral is 'mistral')")
    tokens = dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                  pad_token_id=hf.get("pad_token_id"))
    if model_type == "gpt2":
        _check_sizes(hf, ("vocab_size", "n_layer", "n_head", "n_embd", "n_positions"), ("n_inner",))
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise CheckpointError("GPT-2 with scale_attn_by_inverse_layer_idx=True is not supported")
        act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
        if hf.get("activation_function", "gelu_new") not in act:
            raise CheckpointError(f"unsupported GPT-2 activation_function {hf['activation_function']!r}; "
                                  f"supported: {sorted(act)}")
        return ModelConfig(family="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                           d_model=hf["n_embd"], d_ff=hf.get("n_inner"), max_position=hf["n_positions"],
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           activation=act[hf.get("activation_function", "gelu_new")],
                           tie_embeddings=hf.get("tie_word_embeddings", True), attn_bias=True, mlp_bias=True,
                           **tokens)
    _check_sizes(hf, ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size"),
                 ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window"))
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported hidden_act {hf['hidden_act']!r} for {model_type}; only 'silu' (SwiGLU)")
    # transformers >= 5 writes "rope_parameters" (theta included); older configs use
    # top-level "rope_theta" plus "rope_scaling" (with "type" or "rope_type").
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", *_ROPE_KEYS):
        raise CheckpointError(f"unsupported RoPE scaling type {rope_type!r}; supported: default, linear, llama3")
    if [key for key in _ROPE_KEYS.get(rope_type, ()) if key not in rope]:
        raise CheckpointError(f"RoPE scaling {rope_type!r} needs {list(_ROPE_KEYS[rope_type])}, got {sorted(rope)}")
    rope = {**rope, "rope_type": rope_type} if rope_type != "default" else None
    return ModelConfig(family="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                       n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads"),
                       d_model=hf["hidden_size"], d_ff=hf["intermediate_size"], head_dim=hf.get("head_dim"),
                       max_position=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
                       rope_theta=theta, rope_scaling=rope, sliding_window=hf.get("sliding_window"),
                       tie_embeddings=hf.get("tie_word_embeddings", False),
                       attn_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False), **tokens)


def read_hf_config(path: Path) -> ModelConfig:
    if not path.exists():
        raise CheckpointError(f"{path.parent} has no config.json: expected a Hugging Face model directory "
                              "(config.json and model.safetensors), a .gguf file or a hub id")
    with reading(path, CheckpointError, f"fix it or {REDOWNLOAD}"):
        hf = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} holds a JSON {type(hf).__name__}, not the object of a config.json; {REDOWNLOAD}")
    try:
        return config_from_hf(hf)
    except (ValueError, TypeError, ZeroDivisionError) as e:  # ModelConfig's own checks raise ValueError
        raise CheckpointError(f"{path}: {e}; fix config.json or {REDOWNLOAD}") from e


# ----------------------------------------------------------------------------- 3. safetensors and .bin

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_tensor(path: Path, offset: int, dtype, shape) -> torch.Tensor:
    """A new tensor of `dtype` and `shape` holding the bytes of `path` from `offset`, read straight into it."""
    out = torch.empty(shape, dtype=dtype)
    buffer = out.reshape(-1).view(torch.uint8).numpy()
    with reading(path, CheckpointError, REDOWNLOAD), open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(buffer) != buffer.nbytes:
            raise CheckpointError(f"{path} ends early: the file is truncated; {REDOWNLOAD}")
    return out


def _safetensors_header(path: Path, corrupt) -> tuple[dict, int]:
    """The JSON header of a .safetensors file (its length: 8 bytes, little-endian) and where its data starts."""
    with reading(path, CheckpointError, REDOWNLOAD), open(path, "rb") as f:
        file_size = path.stat().st_size
        start = f.read(8)
        if len(start) < 8:
            raise corrupt(f"it has {len(start)} bytes, fewer than the 8 of the header length")
        (header_len,) = struct.unpack("<Q", start)
        if header_len > file_size - 8:
            raise corrupt(f"its header length {header_len} exceeds the file size {file_size}")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise corrupt(f"its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + header_len


def read_safetensors(path: Path):
    """A .safetensors file: the header's length, a JSON header {name: {"dtype", "shape",
    "data_offsets": [begin, end]}}, then the tensors' raw bytes. Every entry is checked first."""
    def corrupt(problem):
        return CheckpointError(f"{path} is corrupt or truncated: {problem}; {REDOWNLOAD}")
    header, data_start = _safetensors_header(path, corrupt)
    file_size, tensors = path.stat().st_size, {}
    for name, info in header.items():
        try:
            kind, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            valid = all(type(n) is int and n >= 0 for n in (*shape, begin, end))
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise corrupt(f"tensor {name}'s entry {str(info)[:100]} is not dtype, shape and data_offsets")
        if kind not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {kind}, which is not supported "
                                  f"(supported: {sorted(_SAFETENSORS_DTYPES)}); save it in one of those")
        dtype = _SAFETENSORS_DTYPES[kind]
        if end - begin != math.prod(shape) * dtype.itemsize or data_start + end > file_size:
            raise corrupt(f"tensor {name}: bytes {begin}..{end} do not hold shape {shape} of {kind} "
                          f"or lie past the end of the file ({file_size} bytes)")
        tensors[name] = (shape, lambda to_dtype, dtype=dtype, shape=shape, offset=data_start + begin:
                         read_tensor(path, offset, dtype, shape).to(to_dtype))  # no copy if dtypes agree
    return tensors


def read_torch_bin(path: Path):
    """pytorch_model.bin, unpickled with weights_only=True: tensors and plain containers only, so a
    pickle that would run code (os.system in a __reduce__, ...) is refused, never run."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (an interrupted download?); {REDOWNLOAD}")
    with reading(path, CheckpointError, REDOWNLOAD):
        try:  # mmap (no second copy in memory) needs the zip format of torch >= 1.6
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as e:  # weights_only met something other than tensors and containers
            detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:150]
            what = ("holds pickled code or classes, not only tensors" if "Unsupported global" in detail
                    else "is corrupt, truncated, or a pickle of more than tensors")
            raise CheckpointError(f"{path} {what} ({detail}): torch.load(weights_only=True) refused it, and "
                                  "nothing in it ran. Use only checkpoints you trust, and prefer model.safetensors "
                                  f"(it cannot hold code); or {REDOWNLOAD}") from e
        except OSError as e:  # mmap of a truncated zip: "Invalid argument"
            if e.errno != errno.EINVAL:
                raise
            raise CheckpointError(f"{path} is corrupt or truncated (torch.load: {e.strerror}); {REDOWNLOAD}") from e
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path} is not a state dict ({{name: tensor}}) but a {type(state).__name__} "
                              f"of other things; save model.state_dict(), or {REDOWNLOAD}")
    return {name: (tuple(t.shape), lambda dtype, t=t: t.to(dtype)) for name, t in state.items()}


def read_hf_weights(d: Path):
    """(tensors, the files named in errors) of a Hugging Face directory: one weights file, or the
    shards its index lists."""
    listed_by = None
    for index in (d / "model.safetensors.index.json", d / "pytorch_model.bin.index.json"):
        if index.exists():
            listed_by = index.name
            with reading(index, CheckpointError, REDOWNLOAD):
                weight_map = json.loads(index.read_text(encoding="utf-8"))
            if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
                raise CheckpointError(f"{index} has no weight_map {{tensor: shard file}}; {REDOWNLOAD}")
            files = sorted({str(f) for f in weight_map["weight_map"].values()})
            break
    else:
        files = [f for f in ("model.safetensors", "pytorch_model.bin") if (d / f).exists()][:1]
    if not files:
        raise CheckpointError(f"no weights in {d}: expected model.safetensors, model.safetensors.index.json "
                              f"or pytorch_model.bin; {REDOWNLOAD}")
    tensors = {}
    for f in files:
        if not (d / f).is_file():
            raise CheckpointError(f"{d / f} is missing, but {listed_by} lists it as a shard; {REDOWNLOAD}")
        tensors.update((read_safetensors if f.endswith(".safetensors") else read_torch_bin)(d / f))
    return tensors, (d / files[0] if len(files) == 1 else f"{d / listed_by} and its {len(files)} shards")


# ----------------------------------------------------------------------------- 4. HF names <-> our names
# One table per family of (HF module, our module) pairs; "{i}" is a block index. Loading reads it
# left to right, export.py right to left, so a rename lives in one place. A name keeps whatever
# follows the matched module (".weight", ".q_proj.bias", ...).
MODULE_NAMES = {
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
        ("transformer.h.{i}.attn.c_attn", "blocks.{i}.attn.c_attn"),  # q|k|v fused: split by convert
        ("transformer.h.{i}.mlp", "blocks.{i}.mlp"),
    ],
}
GPT2_FUSED = ("q_proj", "k_proj", "v_proj")  # c_attn's row blocks, top to bottom


def rename(cfg: ModelConfig, name: str, to_hf: bool) -> str:
    """A tensor or module name, HF's -> ours (to_hf=False) or ours -> HF's, by the first matching pair."""
    for hf, ours in MODULE_NAMES[cfg.family]:
        source, target = (ours, hf) if to_hf else (hf, ours)
        match = re.match(re.escape(source).replace(r"\{i\}", r"(?P<i>\d+)") + r"(?=\.|$)", name)
        if match:
            return target.format(**match.groupdict()) + name[match.end():]
    return name


# Constant buffers that some checkpoints carry; they are recomputed, not loaded.
_IGNORED = re.compile(r"(\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$)")


def convert(cfg: ModelConfig, tensors: dict, source) -> dict:
    """{name in the file: (shape, load)} -> {our name: (name in the file, shape, load)}: renamed, GPT-2's
    Conv1D weights transposed and its fused c_attn split into q/k/v, constant buffers and a tied
    lm_head (it is the embedding) left out. Nothing is read here: load stays lazy."""
    out = {}
    for file_name, (shape, load) in tensors.items():
        hf_name = file_name
        if cfg.family == "gpt2" and not hf_name.startswith(("transformer.", "lm_head.")):
            hf_name = "transformer." + hf_name  # GPT2Model's checkpoints (no LM head) drop the prefix
        name = rename(cfg, hf_name, to_hf=False)
        if _IGNORED.search(file_name) or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue
        if (cfg.family == "gpt2" and len(shape) == 2 and name.endswith(".weight")
                and re.search(r"\.(c_attn|o_proj|c_fc|c_proj)\.", name)):
            shape, load = shape[::-1], (lambda dtype, load=load: load(dtype).t())  # Conv1D (in, out) -> Linear
        if ".c_attn." not in name:
            out[name] = (file_name, tuple(shape), load)
            continue
        d = cfg.n_head * cfg.head_dim
        if not shape or shape[0] != 3 * d:
            raise CheckpointError(f"{source}: {file_name} has shape {tuple(shape)}, but GPT-2's fused c_attn needs "
                                  f"{3 * d} rows (q, k, v of n_embd={d}); check that config.json belongs to "
                                  f"these weights, or {REDOWNLOAD}")
        fused = functools.lru_cache(maxsize=1)(load)  # read once for q, k and v
        for i, proj in enumerate(GPT2_FUSED):
            out[name.replace("c_attn", proj)] = (file_name, (d, *shape[1:]),
                                                 lambda dtype, i=i, fused=fused: fused(dtype)[i * d:(i + 1) * d])
    return out


# ----------------------------------------------------------------------------- 5. GGUF (llama.cpp)
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
_GGUF_SIZES = ("llama.block_count", "llama.attention.head_count", "llama.embedding_length",
               "llama.feed_forward_length")


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
    if type(alignment) is not int or alignment <= 0:
        raise ValueError(f"general.alignment={alignment!r} is not a positive integer")
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
        raw = read_tensor(path, offset + start * row_bytes, torch.uint8, (n, row_bytes)).numpy()
        out[start:start + n] = torch.from_numpy(quants.dequantize(raw, ggml_type))
    out = out.reshape(shape)
    return unpermute_qk(out, n_head) if n_head else out


def _locate_gguf_tensors(path: Path, index: list, data_start: int) -> dict:
    """{name: (shape, ggml type, absolute offset)}, after checking every tensor's type, size and place
    in the file, before any of them is read."""
    import gguf
    import numpy as np
    file_size, located = path.stat().st_size, {}
    for name, shape, ggml_type, offset in index:
        try:
            ggml_type = gguf.GGMLQuantizationType(ggml_type)
            block, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
            gguf.quants.dequantize(np.zeros((1, block_bytes), np.uint8), ggml_type)  # can this gguf decode it?
        except (ValueError, KeyError, NotImplementedError) as e:
            raise CheckpointError(f"{path}: tensor {name} has ggml type {ggml_type!r}, which the installed gguf "
                                  f"package cannot dequantize ({e}); try upgrading gguf, or use a GGUF quantized "
                                  "as Q8_0, Q4_0, Q4_1, F16 or F32") from e
        if (not shape or shape[-1] % block
                or data_start + offset + math.prod(shape) // block * block_bytes > file_size):
            raise CheckpointError(f"{path} is corrupt or truncated: tensor {name} {shape} of type "
                                  f"{ggml_type.name} does not fit the file; {REDOWNLOAD}")
        located[name] = (shape, ggml_type, data_start + offset)
    return located


def _gguf_config(path: Path, meta: dict, located: dict) -> ModelConfig:
    """The ModelConfig of a llama-architecture GGUF, from its metadata (and its rope_freqs tensor)."""
    try:
        _check_sizes(meta, _GGUF_SIZES, ("llama.attention.head_count_kv", "llama.attention.key_length"))
        n_head, d_model = meta["llama.attention.head_count"], meta["llama.embedding_length"]
        head_dim = meta.get("llama.attention.key_length", d_model // n_head)
        if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
            raise CheckpointError("partial rotary embeddings (llama.rope.dimension_count < head_dim) are not supported")
        scaling = meta.get("llama.rope.scaling.type", "none")
        if scaling == "linear":
            rope_scaling = {"rope_type": "linear", "factor": meta["llama.rope.scaling.factor"]}
        elif scaling == "none":
            rope_scaling = None
        else:
            raise CheckpointError(f"unsupported RoPE scaling {scaling!r}; supported: none, linear, rope_freqs (Llama 3.1)")
        if "rope_freqs.weight" in located:  # Llama 3.1's frequency scaling, precomputed by llama.cpp
            shape, ggml_type, offset = located.pop("rope_freqs.weight")
            factors = _load_gguf_tensor(path, offset, ggml_type, shape, torch.float32)
            rope_scaling = {"rope_type": "freq_factors", "factors": factors.tolist()}
        return ModelConfig(
            family="llama", vocab_size=located["token_embd.weight"][0][0], n_layer=meta["llama.block_count"],
            n_head=n_head, n_kv_head=meta.get("llama.attention.head_count_kv", n_head), d_model=d_model,
            d_ff=meta["llama.feed_forward_length"], head_dim=head_dim,
            max_position=meta.get("llama.context_length", 2048),
            norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=meta.get("llama.rope.freq_base", 10000.0), rope_scaling=rope_scaling,
            tie_embeddings="output.weight" not in located, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"), pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    except KeyError as e:
        raise CheckpointError(f"{path}: the GGUF metadata or tensors lack {e}, which a llama model needs; "
                              f"{REDOWNLOAD}") from e
    except (ValueError, TypeError, ZeroDivisionError) as e:  # CheckpointError is a ValueError
        raise CheckpointError(f"{path}: {e}; {REDOWNLOAD}") from e


def read_gguf(path: Path):
    """(ModelConfig, {HF name: (shape, load)}, tokenizer or None) of a llama.cpp .gguf file."""
    try:
        import gguf  # noqa: F401 - only to say early that it is needed
    except ImportError as e:
        raise CheckpointError(f"loading {path} needs the gguf package: pip install gguf") from e
    with reading(path, CheckpointError, REDOWNLOAD), open(path, "rb") as f:
        try:
            meta, index, data_start = _parse_gguf_header(f, path.stat().st_size)
        except (struct.error, ValueError) as e:  # UnicodeDecodeError is a ValueError
            raise CheckpointError(f"{path} is corrupt or truncated, or not a GGUF file: {e}; {REDOWNLOAD}") from e
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r}; supported: 'llama' (Llama, "
                              "Mistral, TinyLlama, SmolLM2). Convert other models from HF safetensors.")
    located = _locate_gguf_tensors(path, index, data_start)
    cfg = _gguf_config(path, meta, located)
    tensors = {}
    for gguf_name, (shape, ggml_type, offset) in located.items():
        parts = gguf_name.split(".")  # "blk.3.attn_q.weight" or "token_embd.weight"
        block = parts[0] == "blk" and len(parts) > 3
        if block and parts[2] in _GGUF_RENAMES:
            name = f"model.layers.{parts[1]}.{_GGUF_RENAMES[parts[2]]}.{parts[-1]}"
        else:
            name = f"{_GGUF_RENAMES.get(parts[0], parts[0])}.{'.'.join(parts[1:])}"
        n_head = {"attn_q": cfg.n_head, "attn_k": cfg.n_kv_head}.get(parts[2] if block else "")
        tensors[name] = (shape, lambda dtype, shape=shape, t=ggml_type, offset=offset, n_head=n_head:
                         _load_gguf_tensor(path, offset, t, shape, dtype, n_head))
    return cfg, tensors, _gguf_tokenizer(path, meta)


# ----------------------------------------------------------------------------- 6. tokenizer

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


def _gguf_tokenizer(path: Path, meta: dict):
    if meta.get("tokenizer.ggml.model") != "gpt2":
        return None  # SentencePiece ("llama") vocabularies are not rebuilt here; use the HF tokenizer.json
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in _GGUF_PRE_TOKENIZERS:
        raise CheckpointError(f"{path}: the tokenizer uses llama.cpp's pre-tokenizer {pre!r}, which is not rebuilt "
                              f"here (supported: {sorted(_GGUF_PRE_TOKENIZERS)}); load the model's Hugging Face "
                              "directory instead")
    with reading(path, CheckpointError, f"its tokenizer metadata is damaged; {REDOWNLOAD}"):
        tokens = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        special = [t for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind in (3, 4)]  # CONTROL, USER_DEFINED
        return byte_level_bpe({t: i for i, t in enumerate(tokens)}, merges, special, _GGUF_PRE_TOKENIZERS[pre])


def load_tokenizer(d: Path):
    """tokenizer.json if present, else vocab.json + merges.txt (GPT-2 calls it vocab.bpe), else None."""
    from tokenizers import Tokenizer
    d = Path(d)
    fix = "re-download the model's tokenizer files"
    if (d / "tokenizer.json").exists():
        with reading(d / "tokenizer.json", CheckpointError, fix):
            return Tokenizer.from_file(str(d / "tokenizer.json"))
    merges = next((d / m for m in ("merges.txt", "vocab.bpe") if (d / m).exists()), None)
    if not ((d / "vocab.json").exists() and merges):
        return None
    with reading(d / "vocab.json", CheckpointError, fix):
        vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    if not isinstance(vocab, dict):
        raise CheckpointError(f"{d / 'vocab.json'} holds a JSON {type(vocab).__name__}, not {{token: id}}; {fix}")
    with reading(merges, CheckpointError, fix):
        lines = merges.read_text(encoding="utf-8").splitlines()
    merge_list = []
    for number, line in enumerate(lines, 1):
        if line and not line.startswith("#version"):
            merge_list.append(tuple(line.split(" ")))
            if len(merge_list[-1]) != 2:
                raise CheckpointError(f"{merges}, line {number}: {line[:60]!r} is not a merge of two tokens "
                                      f"('a b'); {fix}")
    with reading(merges, CheckpointError, fix):  # e.g. a merge of tokens that vocab.json lacks
        return byte_level_bpe(vocab, merge_list, [s for s in ("<|endoftext|>",) if s in vocab])
