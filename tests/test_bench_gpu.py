"""bench/gpu.py, the one-command GPU benchmark: it runs end to end on the CPU at tiny sizes, and
its FLOP count and peak table are right (checked against transformers' GPT-2 Medium)."""
import json
import math
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu  # noqa: E402

import errors  # noqa: E402
import model as M  # noqa: E402


def test_tiny_cpu_run_trains_decodes_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    results = gpu.main(["--device", "cpu", "--tiny", "--warmup", "1", "--steps", "2", "--repeats", "1",
                        "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    kasa_row, lora_row = results["methods"]
    assert (kasa_row["method"], lora_row["method"]) == ("kasa", "lora")
    cfg, r = gpu.TINY, results["r"]
    # Both adapt q and v in every layer; KaSA also trains its r singular values per layer.
    lora_params = cfg.n_layer * 2 * r * (cfg.d_model + cfg.d_model)
    assert (lora_row["trainable"], kasa_row["trainable"]) == (lora_params, lora_params + cfg.n_layer * 2 * r)
    for row in results["methods"]:
        assert math.isfinite(row["first_loss"]) and row["tokens_per_s"] > 0 and row["peak_memory_bytes"] is None
        assert row["new_tokens"] == gpu.SMALL.prompts * gpu.SMALL.new_tokens   # no eos: every search runs to the limit
        assert row["mfu"] is None                                               # no peak known on the CPU
        assert row["tflops"] == pytest.approx(results["flops_per_token"] * row["tokens_per_s"] / 1e12)
    assert set(results["layer_init_s"]) == {"64x64", "128x128"}
    assert "| kasa |" in capsys.readouterr().out


def test_flops_per_token_is_6N_plus_attention_with_N_from_transformers_gpt2_medium():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        ours = M.Transformer(gpu.GPT2_MEDIUM)
        theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=1024, n_layer=24, n_head=16))
    n = sum(p.numel() for p in theirs.parameters()) - theirs.transformer.wpe.weight.numel()
    assert n == 353_774_592   # GPT-2 Medium's 354.8M parameters without its 1024 x 1024 position table
    assert gpu.train_flops_per_token(ours, 512) == 6 * n + 12 * 24 * 1024 * 512


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("Tesla T4", None)])
def test_peak_comes_from_the_device_name_or_the_flag(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert gpu.peak_tflops(torch.device("cuda"), None) == peak
    assert gpu.peak_tflops(torch.device("cuda"), 123.0) == 123.0
    assert gpu.peak_tflops(torch.device("cpu"), None) is None


def test_bad_flags_are_user_errors():
    with pytest.raises(errors.ConfigError, match="--steps must be at least 1"):
        gpu.parse_args(["--steps", "0"])
    with pytest.raises(errors.ConfigError, match="--device tpu"):
        gpu.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(errors.ConfigError, match="--device cpu --tiny"):
            gpu.resolve_device("cuda")
