"""The truncation report (kasa.truncation_report) and the run plots (plots.write_plots).

The report's numbers are checked against an independent recomputation: numpy's float64 SVD of the
original weights, and the loss of copies of the pretrained model truncated by hand.
"""
import copy
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import eval as evaluation
import kasa
import plots
from model import ModelConfig, Transformer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_transformer(dtype=torch.float64):
    """A 2-block LLaMA-style model; GQA makes v_proj 32 -> 16, so its k = 16 < in."""
    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64)
    return Transformer(config).to(dtype)


TOKENS = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))


def lm_loss(model) -> float:
    return model(TOKENS[:, :-1], targets=TOKENS[:, 1:])[1].item()


def truncated_by_hand(weight: torch.Tensor, t: int) -> torch.Tensor:
    U, S, Vt = np.linalg.svd(weight.detach().double().numpy(), full_matrices=False)
    k = len(S)
    return torch.from_numpy((U[:, :k - t] * S[:k - t]) @ Vt[:k - t])


def test_report_equals_a_direct_recomputation():
    pretrained = tiny_transformer()
    model = copy.deepcopy(pretrained)
    kasa.apply_kasa(model, targets=("q_proj", "v_proj"), r=3)
    report = kasa.truncation_report(model, lambda: lm_loss(model))
    assert json.loads(json.dumps(report)) == report

    names = [name for name, m in pretrained.named_modules() if name.endswith(("q_proj", "v_proj"))]
    loss_original = lm_loss(pretrained)
    expected_delta = {}
    for name in names:
        one_truncated = copy.deepcopy(pretrained)
        layer = one_truncated.get_submodule(name)
        layer.weight.data = truncated_by_hand(layer.weight, 3)
        expected_delta[name] = lm_loss(one_truncated) - loss_original
    all_truncated = copy.deepcopy(pretrained)
    for name in names:
        layer = all_truncated.get_submodule(name)
        layer.weight.data = truncated_by_hand(layer.weight, 3)

    assert report["loss_original"] == pytest.approx(loss_original, abs=1e-12)
    assert report["loss_truncated"] == pytest.approx(lm_loss(all_truncated), abs=1e-10)
    assert [row["name"] for row in report["layers"]] == sorted(names, key=lambda n: -expected_delta[n])
    for row in report["layers"]:
        S = np.linalg.svd(pretrained.get_submodule(row["name"]).weight.detach().numpy(), compute_uv=False)
        assert row["truncation"] == 3
        np.testing.assert_allclose(row["dropped_sigma"], S[-3:], rtol=1e-10)
        assert row["energy_share"] == pytest.approx(np.sum(S[-3:] ** 2) / np.sum(S ** 2), rel=1e-10)
        np.testing.assert_allclose(row["kept_sigma"], S[:-3], rtol=1e-4)   # stored to 5 digits
        assert row["delta_loss"] == pytest.approx(expected_delta[row["name"]], abs=1e-10)
        assert row["delta_loss"] != 0.0


def test_report_gives_back_the_same_weights_bit_for_bit_in_bf16():
    model = tiny_transformer(torch.bfloat16)
    kasa.apply_kasa(model, targets=("q_proj", "v_proj"), r=2)
    model.train()
    parameters = dict(model.named_parameters())
    state = {key: value.clone() for key, value in model.state_dict().items()}
    trainable = {name for name, p in parameters.items() if p.requires_grad}

    report = kasa.truncation_report(model, lambda: lm_loss(model))

    assert report["loss_original"] != report["loss_truncated"]
    assert all(p is parameters[name] for name, p in model.named_parameters())
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    assert model.training


def test_truncation_zero_drops_nothing_and_measures_nothing():
    model = tiny_transformer()
    kasa.apply_kasa(model, targets=("v_proj",), r=2, truncation=0)
    calls = []
    report = kasa.truncation_report(model, lambda: calls.append(1) or lm_loss(model))

    assert len(calls) == 2                                  # truncated and original, no per-layer runs
    assert report["loss_original"] == report["loss_truncated"]
    assert report["warning"] is None
    for row in report["layers"]:
        S = np.linalg.svd(model.get_submodule(row["name"]).weight.detach().numpy(), compute_uv=False)
        assert (row["truncation"], row["dropped_sigma"], row["energy_share"], row["delta_loss"]) == (0, [], 0.0, 0.0)
        np.testing.assert_allclose(row["kept_sigma"], S, rtol=1e-4)
    assert "none (truncation 0)" in kasa.format_truncation_report(report)


def test_report_refuses_a_trained_adapter():
    model = tiny_transformer()
    kasa.apply_kasa(model, targets=("v_proj",), r=2)
    with torch.no_grad():
        model.blocks[1].attn.v_proj.kasa_B[0, 0] = 0.1
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.v_proj .*kasa_B != 0.*before the first optimizer step"):
        kasa.truncation_report(model, lambda: lm_loss(model))


class QV(nn.Module):
    """A loss that only v_proj affects: ‖v_proj(x) − v_proj_original(x)‖², q_proj unused."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)
        self.x = torch.randn(16, 8)
        self.target = self.v_proj(self.x).detach()

    def loss(self):
        return (self.v_proj(self.x) - self.target).square().sum(-1).mean().item()


def test_warning_names_the_worst_layer_and_how_to_exclude_it():
    model = QV()
    kasa.apply_kasa(model, targets=("q_proj", "v_proj"), r=2)
    report = kasa.truncation_report(model, model.loss, warn_above=0.01)
    v_cost = report["loss_truncated"] - report["loss_original"]
    assert v_cost > 0.01
    assert [row["name"] for row in report["layers"]] == ["v_proj", "q_proj"]
    assert [row["delta_loss"] for row in report["layers"]] == [pytest.approx(v_cost, abs=1e-6), 0.0]
    warning = report["warning"]
    assert "worst layers: v_proj" in warning and "q_proj +0.000" in warning
    assert "targets=('q_proj',)" in warning and "truncation=0" in warning   # kasa.py's own API, no train.py flags
    assert "--" not in warning
    assert report["harmless_targets"] == ["q_proj"] and report["harmful_targets"] == ["v_proj"]

    text = kasa.format_truncation_report(report, top=1)
    lines = text.splitlines()
    assert lines[2].startswith("v_proj ") and lines[3] == "... 1 more layers"
    assert f"{report['loss_original']:.4f} (original) -> {report['loss_truncated']:.4f} (truncated)" in text
    assert lines[-1] == "WARNING: " + warning

    quiet = kasa.truncation_report(model, model.loss, warn_above=v_cost + 0.01)
    assert quiet["warning"] is None and "WARNING" not in kasa.format_truncation_report(quiet)


# ----------------------------------------------------------------------------- plots

def write_run_dir(run_dir):
    """The three files a training run leaves for the plots, from a real report and adapter."""
    from safetensors.torch import save_file
    model = tiny_transformer(torch.float32)
    kasa.apply_kasa(model, targets=("q_proj", "v_proj"), r=4)
    report = kasa.truncation_report(model, lambda: lm_loss(model))
    (run_dir / "truncation_report.json").write_text(json.dumps(report))
    save_file(kasa.kasa_state_dict(model), run_dir / "adapter.safetensors")
    history = [{"step": s, "epoch": 0, "loss": 3.0 / s, "l2": 10.0 - s / 30, "l3": 0.99 ** s, "lr": 1e-4}
               for s in range(1, 301)]
    (run_dir / "history.json").write_text(json.dumps(history))


def test_plots_are_written_as_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    write_run_dir(tmp_path)
    written = evaluation.main(["--plots", str(tmp_path)])["plots"]
    plots = tmp_path / "plots"
    assert sorted(written) == sorted(str(plots / name) for name in ("loss_curves.png", "delta_sigma.png",
                                                                   "spectrum.png"))
    for path in plots.iterdir():
        content = path.read_bytes()
        assert path.suffix == ".png"                        # no temporary file left behind
        assert content.startswith(PNG_SIGNATURE) and len(content) > 1000


def test_plots_skip_missing_inputs_one_line_each(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert plots.write_plots(tmp_path) == []
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for line, source in zip(lines, ("history.json", "adapter.safetensors", "truncation_report.json")):
        assert line.startswith("skipped") and source in line


def test_without_matplotlib_one_line_says_what_was_skipped(tmp_path, capsys, monkeypatch):
    write_run_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert plots.write_plots(tmp_path) == []
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "matplotlib is not installed" in lines[0]
    assert not (tmp_path / "plots").exists()


def test_heat_map_rows_follow_block_order():
    names = ["blocks.10.attn.v_proj", "blocks.9.attn.v_proj", "blocks.1.attn.v_proj"]
    assert [plots._short_layer_name(n) for n in sorted(names, key=plots._layer_order)] == \
        ["1.v_proj", "9.v_proj", "10.v_proj"]
