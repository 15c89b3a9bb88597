"""The data-aware truncation criterion (kasa.py: truncation_criterion='activation') against float64
recomputations, brute force over all triplet subsets, and the paper's criterion on white inputs."""
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import kasa
import train


class TwoProjections(nn.Module):
    def __init__(self, d_in=12, d_q=8, d_v=14, dtype=torch.float64):
        super().__init__()
        self.q_proj = nn.Linear(d_in, d_q, dtype=dtype)
        self.v_proj = nn.Linear(d_q, d_v, bias=False, dtype=dtype)

    def forward(self, x):
        return self.v_proj(torch.tanh(self.q_proj(x)))


def fresh_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return TwoProjections(dtype=dtype)


def skewed_inputs(model, n=64, seed=1):
    """Inputs with most of their energy along q_proj's smallest right singular directions, so the
    two criteria disagree (white inputs would make them agree)."""
    generator = torch.Generator().manual_seed(seed)
    _, _, Vh = torch.linalg.svd(model.q_proj.weight.detach())
    scale = torch.linspace(0.2, 5.0, Vh.shape[1], dtype=torch.float64)    # largest along the last v_i
    return (torch.randn(n, Vh.shape[1], generator=generator, dtype=torch.float64) * scale) @ Vh


def calibrate(model, x):
    return kasa.collect_input_statistics(model, ("q_proj", "v_proj"), lambda: [model(x[:40]), model(x[40:, None])])


def test_statistics_and_scores_match_a_float64_recomputation():
    model = fresh_model()
    x = skewed_inputs(model)
    calibration = calibrate(model, x)      # two calls of different shapes: rows are pooled, not batches
    hidden = torch.tanh(model.q_proj(x)).detach().numpy()
    for name, inputs in (("q_proj", x.numpy()), ("v_proj", hidden)):
        np.testing.assert_allclose(calibration[name].numpy(), inputs.T @ inputs / len(inputs), rtol=1e-12, atol=1e-14)
        W = getattr(model, name).weight.detach().numpy()
        U, S, Vt = np.linalg.svd(W, full_matrices=False)
        expected = ((inputs @ Vt.T * S) ** 2).mean(axis=0)                  # E[(σ_i v_iᵀx)²], row by row
        scores = kasa.output_energy_scores(getattr(model, name).weight, calibration[name])[3].numpy()
        np.testing.assert_allclose(scores, expected, rtol=1e-10)
        np.testing.assert_allclose(scores.sum(), (np.linalg.norm(inputs @ W.T, axis=1) ** 2).mean(), rtol=1e-10)
    assert model.training                  # collect_input_statistics restores the mode and removes its hooks
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("shape", [(10, 7), (7, 10), (8, 8)])
def test_white_inputs_pick_the_papers_triplets(shape):
    torch.manual_seed(0)
    base = nn.Linear(shape[1], shape[0], dtype=torch.float64)
    paper = kasa.KaSALinear(base, r=3)
    ours = kasa.KaSALinear(base, r=3, second_moment=2.5 * torch.eye(shape[1], dtype=torch.float64))
    k = min(shape)
    assert ours.kasa_dropped_index.tolist() == paper.kasa_dropped_index.tolist() == list(range(k - 3, k))
    torch.testing.assert_close(ours.weight, paper.weight, atol=1e-12, rtol=0)


def test_chosen_set_removes_the_least_output_energy_of_all_subsets():
    model = fresh_model()
    x = skewed_inputs(model)
    calibration = calibrate(model, x)
    W = model.q_proj.weight.detach().numpy()
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    r = 3

    def removed_energy(subset):           # E‖W_D x‖² on the calibration inputs, D = the subset's triplets
        D = list(subset)
        return (np.linalg.norm(x.numpy() @ ((U[:, D] * S[D]) @ Vt[D]).T, axis=1) ** 2).mean()
    energies = {subset: removed_energy(subset) for subset in itertools.combinations(range(len(S)), r)}
    best = min(energies, key=energies.get)
    kasa.apply_kasa(model, r=r, truncation_criterion="activation", calibration=calibration)
    layer = model.q_proj
    assert tuple(layer.kasa_dropped_index.tolist()) == best
    assert best != tuple(range(len(S) - r, len(S)))            # the paper's set is not it: the test can fail
    assert energies[best] < energies[tuple(range(len(S) - r, len(S)))]
    np.testing.assert_allclose(((layer.kasa_dropped_US @ layer.kasa_dropped_Vt).numpy()),
                               (U[:, list(best)] * S[list(best)]) @ Vt[list(best)], atol=1e-12)


def test_state_dict_round_trip_runs_no_svd_and_restores_exactly(monkeypatch, tmp_path):
    model = fresh_model()
    original = {name: getattr(model, name).weight.detach().clone() for name in ("q_proj", "v_proj")}
    x = skewed_inputs(model)
    kasa.apply_kasa(model, r=3, truncation_criterion="activation", calibration=calibrate(model, x))
    for layer in (model.q_proj, model.v_proj):
        layer.kasa_B.data.normal_()
    from safetensors.torch import load_file, save_file
    save_file(kasa.kasa_state_dict(model), tmp_path / "adapter.safetensors")
    state = load_file(tmp_path / "adapter.safetensors")

    def no_decomposition(*args, **kwargs):
        raise AssertionError("loading an adapter must not decompose W")
    for name in ("svd", "svdvals", "eigh"):
        monkeypatch.setattr(torch.linalg, name, no_decomposition)
    loaded = fresh_model()
    kasa.load_kasa_state_dict(loaded, state)
    monkeypatch.undo()
    for name in ("q_proj", "v_proj"):
        ours, theirs = getattr(model, name), getattr(loaded, name)
        assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.kasa_dropped_index, theirs.kasa_dropped_index)
        torch.testing.assert_close(theirs.restore_base().weight, original[name], atol=1e-12, rtol=0)
    assert torch.equal(loaded(x), model(x))
    assert model.q_proj.kasa_dropped_index.tolist() != [5, 6, 7]   # not the paper's set (k = 8, t = 3)

    # An adapter saved before kasa_dropped_index existed dropped the t smallest σ: it loads as that.
    paper = fresh_model()
    kasa.apply_kasa(paper, r=3)
    old = {k: v for k, v in kasa.kasa_state_dict(paper).items() if not k.endswith("kasa_dropped_index")}
    reloaded = fresh_model()
    kasa.load_kasa_state_dict(reloaded, old)
    assert reloaded.q_proj.kasa_dropped_index.tolist() == [5, 6, 7] and torch.equal(reloaded.q_proj.weight, paper.q_proj.weight)

    corrupt = {**state, "q_proj.kasa_dropped_index": torch.tensor([1, 1, 2])}
    before = fresh_model()
    with pytest.raises(kasa.KaSAError, match="kasa_dropped_index must be 3 distinct integers"):
        kasa.load_kasa_state_dict(before, corrupt)
    assert type(before.q_proj) is nn.Linear                   # all or nothing


def test_lora_export_is_exact_for_an_activation_truncation():
    model = fresh_model()
    W = model.v_proj.weight.detach().clone()
    kasa.apply_kasa(model, r=3, alpha=6, truncation_criterion="activation", calibration=calibrate(model, skewed_inputs(model)))
    layer = model.v_proj
    layer.kasa_B.data.normal_()
    B_total, A_total = kasa.lora_factors(layer)
    fine_tuned = (layer.weight + layer.delta_weight()).detach()
    torch.testing.assert_close(W + B_total @ A_total, fine_tuned, atol=1e-12, rtol=0)


def test_bad_calibration_is_rejected_and_leaves_the_model_as_it_was():
    model = fresh_model()
    calibration = calibrate(model, skewed_inputs(model))
    cases = [
        (dict(truncation_criterion="activation"), "pass both, or neither"),
        (dict(calibration=calibration), "pass both, or neither"),
        (dict(truncation_criterion="energy", calibration=calibration), "unknown truncation_criterion"),
        (dict(truncation_criterion="activation", calibration={"q_proj": calibration["q_proj"]}),
         r"v_proj: .*calibration has none: collect it with kasa.collect_input_statistics"),
        (dict(truncation_criterion="activation", calibration={**calibration, "q_proj": torch.eye(5)}),
         r"q_proj: calibration\['q_proj'\] is \(5, 5\)"),
        (dict(truncation_criterion="activation", calibration={**calibration, "q_proj": calibration["q_proj"] * np.nan}),
         "NaN or infinite"),
    ]
    for kwargs, message in cases:
        with pytest.raises(kasa.KaSAError, match=message):
            kasa.apply_kasa(model, r=3, **kwargs)
        assert type(model.q_proj) is nn.Linear and type(model.v_proj) is nn.Linear
    with pytest.raises(kasa.KaSAError, match="sent no input through"):
        kasa.collect_input_statistics(model, ("q_proj",), lambda: None)


def test_report_measures_both_criteria_side_by_side():
    model = fresh_model()
    x = skewed_inputs(model)
    reference = model(x).detach()
    calibration = calibrate(model, x)

    @torch.no_grad()
    def loss(m):
        return (m(x) - reference).square().mean()
    by_activation = fresh_model()
    kasa.apply_kasa(by_activation, r=3, truncation_criterion="activation", calibration=calibration)
    kasa.apply_kasa(model, r=3)                               # the layers apply the paper's criterion
    own = model.q_proj.weight
    report = kasa.truncation_report(model, lambda: loss(model), calibration=calibration)
    assert report["loss_truncated_by"]["sigma"] == pytest.approx(report["loss_truncated"], abs=1e-15)
    assert report["loss_truncated_by"]["activation"] == pytest.approx(float(loss(by_activation)), rel=1e-9)
    assert report["loss_truncated_by"]["activation"] < report["loss_truncated_by"]["sigma"]
    for row in report["layers"]:
        sigma, activation = row["criteria"]["sigma"], row["criteria"]["activation"]
        assert sigma["delta_loss"] == row["delta_loss"] and sigma["dropped_index"] == row["dropped_index"]
        assert activation["dropped_index"] == getattr(by_activation, row["name"]).kasa_dropped_index.tolist()
        assert activation["output_energy_share"] <= sigma["output_energy_share"] + 1e-15
    text = kasa.format_truncation_report(report)
    assert "Δloss σ | act" in text and "every layer truncated by sigma" in text
    assert model.q_proj.weight is own                         # the model's own Parameters again


def test_train_flags_calibrate_deterministically_and_resume(tiny_gpt2_dir, shared_data, tmp_path):
    pytest.importorskip("transformers")
    args = ["--model", str(tiny_gpt2_dir), "--data-dir", str(shared_data / "e2e"), "--max-train-examples", "32",
            "--batch-size", "4", "--max-len", "64", "--warmup-steps", "1", "--no-eval", "--seed", "3",
            "--truncation-criterion", "activation", "--calibration-batches", "2"]
    train.main([*args, "--max-steps", "1", "--save-every", "1", "--out-dir", str(tmp_path / "a")])
    train.main([*args, "--max-steps", "0", "--out-dir", str(tmp_path / "b")])
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["truncation_criterion"], config["calibration_batches"]) == ("activation", 2)
    from safetensors.torch import load_file
    first, second = (load_file(tmp_path / run / "adapter.safetensors") for run in "ab")
    index = [key for key in first if key.endswith("kasa_dropped_index")]
    assert index and all(torch.equal(first[key], second[key]) for key in index)     # the same seed: the same set
    report = json.loads((tmp_path / "a" / "truncation_report.json").read_text())
    assert all(row["criteria"]["activation"]["dropped_index"] == row["dropped_index"] for row in report["layers"])
    train.main([*args, "--max-steps", "2", "--save-every", "1", "--out-dir", str(tmp_path / "a"), "--resume"])
    from errors import ConfigError
    for argv, message in ((["--truncation-criterion", "energy"], "unknown; choose one of sigma, activation"),
                          (["--truncation-criterion", "activation", "--method", "lora"], "needs --method kasa"),
                          (["--truncation-criterion", "activation", "--calibration-batches", "0"], "≥ 1")):
        with pytest.raises(ConfigError, match=message):
            train.parse_config(argv)
    saved = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["config"]
    fixed, _ = train.resume_differences(saved, train.parse_config([*args, "--truncation-criterion", "sigma"]))
    assert any(line.startswith("--truncation-criterion activation -> sigma") for line in fixed)
