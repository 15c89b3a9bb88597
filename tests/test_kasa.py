"""kasa.py against independent references: numpy float64 SVD, closed-form formulas, and PEFT's KaSA."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import kasa
from conftest import REPO


class TwoProjections(nn.Module):
    """The smallest model with KaSA's default targets."""

    def __init__(self, d_in=24, d_q=16, d_v=32, dtype=torch.float32):
        super().__init__()
        self.q_proj = nn.Linear(d_in, d_q, dtype=dtype)
        self.v_proj = nn.Linear(d_q, d_v, bias=False, dtype=dtype)
        self.head = nn.Linear(d_v, 3, dtype=dtype)

    def forward(self, x):
        return self.head(torch.tanh(self.v_proj(self.q_proj(x))))


def randomize_adapter(model):
    """Give every KaSA layer a non-zero B so that ΔW ≠ 0 (at init B = 0)."""
    for m in model.modules():
        if isinstance(m, kasa.KaSALinear):
            m.kasa_B.data.normal_(0, 0.5)


def adapted_two_projections(seed: int):
    """(pretrained state dict, a TwoProjections loaded from it with an r=4 adapter whose ΔW ≠ 0)."""
    torch.manual_seed(seed)
    pretrained = TwoProjections().state_dict()
    model = TwoProjections()
    model.load_state_dict(pretrained)
    kasa.apply_kasa(model, r=4, alpha=8)
    randomize_adapter(model)
    return pretrained, model


def numpy_world(W: np.ndarray, r: int) -> np.ndarray:
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    k = len(S)
    return (U[:, :k - r] * S[:k - r]) @ Vt[:k - r]


METHODS = ("svd", "gram", "subspace")


@pytest.fixture(params=METHODS)
def truncation_method(request, monkeypatch):
    """Run a test with every exact truncation path (kasa.TRUNCATION_METHODS) as the default."""
    monkeypatch.setattr(kasa, "default_truncation_method", lambda *shape_and_dtype: request.param)
    return request.param


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32)], ids=["tall", "wide", "square"])
def test_truncation_drops_the_r_smallest_triplets(shape, truncation_method):
    r = 5
    base = nn.Linear(shape[1], shape[0], dtype=torch.float64)
    W = base.weight.detach().clone()
    layer = kasa.KaSALinear(base, r=r)
    W_world = layer.weight.detach()
    k = min(shape)
    assert torch.linalg.matrix_rank(W_world).item() == k - r
    smallest = np.linalg.svd(W.numpy(), compute_uv=False)[-r:]
    assert np.isclose((W - W_world).norm().item(), np.linalg.norm(smallest), rtol=1e-10)
    np.testing.assert_allclose(W_world.numpy(), numpy_world(W.numpy(), r), atol=1e-12)
    assert layer.kasa_dropped_US.shape == (shape[0], r) and layer.kasa_dropped_Vt.shape == (r, shape[1])
    np.testing.assert_allclose(layer.kasa_dropped_US.norm(dim=0).numpy(), smallest, rtol=1e-10)  # σ, descending
    torch.testing.assert_close(layer.kasa_dropped_Vt @ layer.kasa_dropped_Vt.T, torch.eye(r, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.restore_base().weight, W, atol=1e-12, rtol=0)


def spectrum_matrix(out_features, in_features, sigma, seed=0):
    """U diag(sigma) Vᵀ with random orthonormal U, V (float64)."""
    generator = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out_features, len(sigma), generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(in_features, len(sigma), generator=generator, dtype=torch.float64)).Q
    return (U * sigma) @ V.T


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(96, 96), (64, 160), (160, 64)], ids=["square", "wide", "tall"])
def test_every_method_is_exact_to_float32_rounding(method, shape):
    """A float32 weight with a pretrained-like spectrum (slow decay, crowded tail): every path gives the
    float64 SVD's W_world to float32 rounding, rank k - r, and the r smallest σ² as removed energy."""
    k, r = min(shape), 8
    sigma = torch.linspace(1, 0, k, dtype=torch.float64) ** 2 + 0.02 + 1e-3 * torch.rand(k, dtype=torch.float64)
    W = spectrum_matrix(*shape, sigma.sort(descending=True).values).float()
    W_world, US, Vt = kasa.truncate_minor_components(W, r, method)
    assert W_world.dtype == US.dtype == Vt.dtype == torch.float32
    reference = torch.from_numpy(numpy_world(W.double().numpy(), r))
    assert (W_world.double() - reference).norm() <= 1e-6 * W.norm()
    assert torch.linalg.matrix_rank(W_world.double(), rtol=1e-4).item() == k - r
    smallest = torch.linalg.svdvals(W.double())[-r:]
    torch.testing.assert_close(US.double().norm(dim=0), smallest, rtol=1e-5, atol=0)
    torch.testing.assert_close((W_world + US @ Vt), W, atol=1e-6 * W.abs().max().item(), rtol=0)


def test_iterative_path_falls_back_instead_of_being_inexact(monkeypatch):
    """A singular square weight and a too-small iteration budget both end in an exact result."""
    W = spectrum_matrix(64, 64, torch.cat([torch.linspace(2, 1, 60), torch.zeros(4)]).double())
    reference = kasa.truncate_minor_components(W, 6, "svd")[0]
    torch.testing.assert_close(kasa.truncate_minor_components(W, 6, "subspace")[0], reference, atol=1e-12, rtol=0)
    W = spectrum_matrix(64, 64, torch.linspace(2, 1, 64).double())
    assert kasa._smallest_by_subspace_iteration(W, 6, max_iter=1) is None
    assert kasa._smallest_by_subspace_iteration(W, 6) is not None


def test_forward_equals_dense_float64_recomputation(truncation_method):
    r, alpha = 4, 12.0
    base = nn.Linear(20, 12, dtype=torch.float64)
    W, b = base.weight.detach().numpy().copy(), base.bias.detach().numpy().copy()
    layer = kasa.KaSALinear(base, r=r, alpha=alpha)
    layer.kasa_B.data.normal_()
    A, B, s = (t.detach().numpy() for t in (layer.kasa_A, layer.kasa_B, layer.kasa_sigma))
    x = torch.randn(3, 7, 20, dtype=torch.float64)
    expected = x.numpy() @ (numpy_world(W, r) + alpha / r * B @ np.diag(s) @ A).T + b
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, atol=1e-10)


def test_update_is_zero_at_init():
    base = nn.Linear(16, 16)
    layer = kasa.KaSALinear(base, r=2)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert torch.count_nonzero(layer.kasa_B) == 0 and layer.kasa_sigma.std() > 0


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_merge_unmerge_restore(dtype, atol, truncation_method):
    model = TwoProjections(dtype=dtype)
    original = {n: model.get_submodule(n).weight.detach().clone() for n in ("q_proj", "v_proj")}
    kasa.apply_kasa(model, r=4, alpha=8)
    randomize_adapter(model)
    x = torch.randn(6, 24, dtype=dtype)
    with torch.no_grad():
        unmerged = model(x)
        kasa.merge_kasa(model)
        merged = model(x)
        kasa.unmerge_kasa(model)
        again = model(x)
    torch.testing.assert_close(merged, unmerged, atol=atol, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=atol, rtol=0)
    for name, W in original.items():
        restored = model.get_submodule(name).restore_base().weight
        assert restored.dtype == dtype
        torch.testing.assert_close(restored.float(), W.float(), atol=atol * 0.1, rtol=0)
    with pytest.raises(RuntimeError, match="not merged"):
        kasa.unmerge_kasa(model)


def test_only_adapter_trains_and_base_is_untouched():
    model = TwoProjections()
    kasa.apply_kasa(model, r=4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{l}.kasa_{p}" for l in ("q_proj", "v_proj") for p in ("A", "B", "sigma"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        l2, l3 = kasa.kasa_regularization(model)
        loss = model(torch.randn(8, 24)).square().mean() + 1e-2 * l2 + 1e-2 * l3
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, name
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert model.q_proj.kasa_B.abs().sum() > 0


def test_regularizer_equals_formula():
    model = TwoProjections(dtype=torch.float64)
    kasa.apply_kasa(model, r=3)
    randomize_adapter(model)
    l2, l3 = kasa.kasa_regularization(model)
    expected_l2 = expected_l3 = 0.0
    for name in ("q_proj", "v_proj"):
        m = model.get_submodule(name)
        A, B, s = (t.detach().numpy() for t in (m.kasa_A, m.kasa_B, m.kasa_sigma))
        expected_l2 += np.sum(s ** 2)
        expected_l3 += np.linalg.norm(B.T @ B - np.eye(3), "fro") ** 2 + np.linalg.norm(A @ A.T - np.eye(3), "fro") ** 2
    assert l2.dtype == torch.float32 and l3.dtype == torch.float32
    assert np.isclose(l2.item(), expected_l2, rtol=1e-5)
    assert np.isclose(l3.item(), expected_l3, rtol=1e-5)


def test_regularizer_is_zero_at_orthonormal_factors_and_passes_gradients():
    model = TwoProjections()
    kasa.apply_kasa(model, r=3)
    for m in (model.q_proj, model.v_proj):
        m.kasa_A.data = torch.linalg.qr(torch.randn(m.in_features, 3))[0].T.contiguous()
        m.kasa_B.data = torch.linalg.qr(torch.randn(m.out_features, 3))[0]
        m.kasa_sigma.data.zero_()
    l2, l3 = kasa.kasa_regularization(model)
    assert l2.item() == 0 and abs(l3.item()) < 1e-10
    for m in (model.q_proj, model.v_proj):
        m.kasa_A.data.mul_(1.1)
        m.kasa_sigma.data.fill_(0.5)
    l2, l3 = kasa.kasa_regularization(model)
    (l2 + l3).backward()
    assert model.q_proj.kasa_A.grad.abs().sum() > 0 and model.v_proj.kasa_sigma.grad.abs().sum() > 0
    assert torch.allclose(model.q_proj.kasa_sigma.grad, torch.full((3,), 1.0))   # d‖σ‖²/dσ = 2σ


def test_matches_peft_kasa():
    peft = pytest.importorskip("peft")
    if not hasattr(peft, "KasaConfig"):
        pytest.skip("this peft has no KaSA variant (needs peft >= 0.21)")
    ours = TwoProjections()
    theirs = TwoProjections()
    theirs.load_state_dict(ours.state_dict())
    kasa.apply_kasa(ours, r=4, alpha=8)
    randomize_adapter(ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             kasa_config=peft.KasaConfig())
    theirs = peft.get_peft_model(theirs, config)
    for name in ("q_proj", "v_proj"):
        mine = ours.get_submodule(name)
        other = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(other.base_layer.weight, mine.weight, atol=1e-5, rtol=0)
        with torch.no_grad():
            other.lora_A["default"].weight.copy_(mine.kasa_A)
            other.lora_B["default"].weight.copy_(mine.kasa_B)
            other.lora_diag["default"].copy_(mine.kasa_sigma)
    x = torch.randn(5, 24)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_bf16_base_with_fp32_adapter():
    model = TwoProjections(dtype=torch.bfloat16)
    reference = TwoProjections(dtype=torch.float32)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    kasa.apply_kasa(model, r=4)
    kasa.apply_kasa(reference, r=4)
    for m, ref in ((model.q_proj, reference.q_proj), (model.v_proj, reference.v_proj)):
        assert m.weight.dtype == torch.bfloat16
        assert m.kasa_A.dtype == m.kasa_B.dtype == m.kasa_sigma.dtype == torch.float32
        m.kasa_B.data.normal_(0, 0.5)
        for p in ("kasa_A", "kasa_B", "kasa_sigma"):
            getattr(ref, p).data.copy_(getattr(m, p))
    x = torch.randn(4, 24)
    y = model(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference(x), atol=0.1, rtol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_autocast = model(x)
        y_autocast.float().sum().backward()
    torch.testing.assert_close(y_autocast.float(), reference(x), atol=0.1, rtol=0.05)
    assert model.q_proj.kasa_A.grad.dtype == torch.float32


def test_state_dict_round_trip_without_svd(monkeypatch, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    pretrained, model = adapted_two_projections(seed=1)
    x = torch.randn(3, 24)
    expected = model(x)
    path = tmp_path / "adapter.safetensors"
    safetensors_torch.save_file(kasa.kasa_state_dict(model), path)

    def no_svd(*args, **kwargs):
        raise AssertionError("loading an adapter must not run an SVD")
    monkeypatch.setattr(torch.linalg, "svd", no_svd)

    fresh = TwoProjections()
    fresh.load_state_dict(pretrained)
    assert kasa.load_kasa_state_dict(fresh, safetensors_torch.load_file(path)) == ["q_proj", "v_proj"]
    assert torch.equal(fresh(x), expected)
    assert sorted(n for n, p in fresh.named_parameters() if p.requires_grad) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad)
    # Loading again onto the already-adapted model resets it onto the saved adapter.
    fresh.q_proj.kasa_B.data.zero_()
    kasa.load_kasa_state_dict(fresh, kasa.kasa_state_dict(model))
    torch.testing.assert_close(fresh(x), expected, atol=1e-6, rtol=0)


def test_wrong_base_or_incomplete_adapter_is_refused():
    model = TwoProjections()
    kasa.apply_kasa(model, r=4)
    state = kasa.kasa_state_dict(model)
    with pytest.raises(ValueError, match="base weights differ"):
        kasa.load_kasa_state_dict(TwoProjections(), state)      # another random init
    incomplete = {k: v for k, v in state.items() if k != "v_proj.kasa_sigma"}
    with pytest.raises(KeyError, match="missing tensors.*v_proj.kasa_sigma"):
        kasa.load_kasa_state_dict(TwoProjections(), incomplete)
    with pytest.raises(KeyError, match="model lacks"):
        kasa.load_kasa_state_dict(TwoProjections(), {"k_proj." + k.split(".", 1)[1]: v for k, v in state.items()})


def test_clear_errors():
    with pytest.raises(ValueError, match="r=0"):
        kasa.KaSALinear(nn.Linear(8, 8), r=0)
    with pytest.raises(ValueError, match=r"r=8 must satisfy .* min\(out, in\) = 8"):
        kasa.KaSALinear(nn.Linear(8, 16), r=8)
    quantized = nn.Linear(8, 8)
    quantized.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="floating-point"):
        kasa.KaSALinear(quantized, r=2)
    with pytest.raises(ValueError, match="meta device"):
        kasa.KaSALinear(nn.Linear(8, 8, device="meta"), r=2)
    model = TwoProjections()
    kasa.apply_kasa(model, r=2)
    with pytest.raises(ValueError, match="already a KaSALinear"):
        kasa.apply_kasa(model, r=2)
    with pytest.raises(TypeError, match="not an nn.Linear"):
        kasa.apply_kasa(nn.Sequential(nn.Conv1d(4, 4, 1)), targets=("0",))
    with pytest.raises(ValueError, match=r"no module name ends with.*\['head', 'q_proj', 'v_proj'\]"):
        kasa.apply_kasa(TwoProjections(), targets=("c_attn",))
    with pytest.raises(ValueError, match="no KaSA layers"):
        kasa.kasa_regularization(TwoProjections())


def test_self_test_runs():
    result = subprocess.run([sys.executable, "kasa.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "merged forward == unmerged forward" in result.stdout


# ----------------------------------------------------------------------------- ablation switches

def test_switches_off_equal_peft_lora():
    """truncation=0 and learn_sigma=False leave nothing of KaSA but the low-rank update: PEFT's LoRA."""
    peft = pytest.importorskip("peft")
    ours, theirs = TwoProjections(), TwoProjections()
    theirs.load_state_dict(ours.state_dict())
    original = ours.q_proj.weight.detach().clone()
    kasa.apply_kasa(ours, r=4, alpha=8, truncation=0, learn_sigma=False)
    randomize_adapter(ours)
    assert torch.equal(ours.q_proj.weight, original) and ours.q_proj.kasa_dropped_US.shape == (16, 0)
    assert torch.equal(ours.q_proj.kasa_sigma, torch.ones(4))
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        f"{l}.kasa_{p}" for l in ("q_proj", "v_proj") for p in ("A", "B"))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name in ("q_proj", "v_proj"):
        mine, other = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            other.lora_A["default"].weight.copy_(mine.kasa_A)
            other.lora_B["default"].weight.copy_(mine.kasa_B)
    x = torch.randn(5, 24)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


def test_truncation_smaller_than_rank(truncation_method):
    base = nn.Linear(24, 40, dtype=torch.float64)
    W = base.weight.detach().clone()
    layer = kasa.KaSALinear(base, r=8, truncation=2)
    assert torch.linalg.matrix_rank(layer.weight).item() == 24 - 2
    np.testing.assert_allclose(layer.weight.detach().numpy(), numpy_world(W.numpy(), 2), atol=1e-12)
    assert layer.kasa_A.shape == (8, 24) and layer.kasa_dropped_Vt.shape == (2, 24)
    torch.testing.assert_close(layer.restore_base().weight, W, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="truncation=24"):
        kasa.KaSALinear(nn.Linear(24, 40), r=4, truncation=24)


def test_switched_off_adapter_round_trips_through_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    pretrained = TwoProjections().state_dict()
    model = TwoProjections()
    model.load_state_dict(pretrained)
    kasa.apply_kasa(model, r=4, truncation=0, learn_sigma=False)
    randomize_adapter(model)
    safetensors_torch.save_file(kasa.kasa_state_dict(model), tmp_path / "a.safetensors")
    fresh = TwoProjections()
    fresh.load_state_dict(pretrained)
    kasa.load_kasa_state_dict(fresh, safetensors_torch.load_file(tmp_path / "a.safetensors"))
    x = torch.randn(3, 24)
    assert torch.equal(fresh(x), model(x))
    assert not fresh.q_proj.kasa_sigma.requires_grad and fresh.q_proj.kasa_A.requires_grad


# ----------------------------------------------------------------------------- errors: all or nothing

def snapshot(model):
    """Every module's type and every tensor (parameters and buffers) with its requires_grad."""
    return ({name: type(m) for name, m in model.named_modules()},
            {name: (t.detach().clone(), t.requires_grad) for name, t in model.state_dict(keep_vars=True).items()})


def assert_unchanged(model, before):
    types, tensors = snapshot(model)
    assert types == before[0]
    assert tensors.keys() == before[1].keys()
    for name, (tensor, grad) in tensors.items():
        assert torch.equal(tensor, before[1][name][0]) and grad == before[1][name][1], name


def test_apply_kasa_is_all_or_nothing():
    model = nn.Sequential()
    model.add_module("a_proj", nn.Linear(32, 32))
    model.add_module("b_proj", nn.Linear(32, 4))               # k = 4: too small for r = 4
    before = snapshot(model)
    with pytest.raises(kasa.KaSAError, match=r"b_proj: r=4 must satisfy 1 <= r < min\(out, in\) = 4.*smaller r"):
        kasa.apply_kasa(model, targets=("a_proj", "b_proj"), r=4)
    assert_unchanged(model, before)
    model.add_module("c_proj", nn.Conv1d(4, 4, 1))
    before = snapshot(model)
    with pytest.raises(TypeError, match="c_proj is a Conv1d"):
        kasa.apply_kasa(model, targets=("a_proj", "c_proj"), r=2)
    assert_unchanged(model, before)


def test_kasa_error_is_a_value_error_with_its_fix():
    assert issubclass(kasa.KaSAError, ValueError) and "KaSAError" in kasa.__all__
    with pytest.raises(kasa.KaSAError, match="already merged: call unmerge"):
        layer = kasa.KaSALinear(nn.Linear(8, 8), r=2)
        layer.merge()
        layer.merge()
    with pytest.raises(kasa.KaSAError, match=r"apply_kasa\(model, targets=\.\.\.\)"):
        kasa.apply_kasa(TwoProjections(), targets=("c_attn",))


@pytest.fixture
def trained_adapter():
    pretrained, model = adapted_two_projections(seed=3)
    return pretrained, kasa.kasa_state_dict(model)


def bad_adapters(state):
    """(name, state dict, message) triples, each broken in v_proj, the later of the two layers."""
    def changed(key, value):
        return {**state, key: value}
    nan_B = state["v_proj.kasa_B"].clone()
    nan_B[0, 0] = float("nan")
    return [("one_row_A", changed("v_proj.kasa_A", state["v_proj.kasa_A"][:1].clone()), r"kasa_A has shape \(1, 16\)"),
            ("wide_US", changed("v_proj.kasa_dropped_US", torch.zeros(32, 5)), "kasa_dropped_US has shape"),
            ("nan", changed("v_proj.kasa_B", nan_B), "NaN"),
            ("int_sigma", changed("v_proj.kasa_sigma", torch.ones(4, dtype=torch.int64)), "not floating point")]


@pytest.mark.parametrize("adapted", [False, True], ids=["plain", "already_adapted"])
def test_load_kasa_state_dict_is_all_or_nothing(trained_adapter, adapted):
    pretrained, state = trained_adapter
    model = TwoProjections()
    model.load_state_dict(pretrained)
    if adapted:
        kasa.apply_kasa(model, r=2)
    before = snapshot(model)
    for label, bad, message in bad_adapters(state):
        with pytest.raises(kasa.KaSAError, match=message):
            kasa.load_kasa_state_dict(model, bad)
        assert_unchanged(model, before)
    other = TwoProjections()
    other.load_state_dict(pretrained)
    with torch.no_grad():
        other.v_proj.weight.mul_(1.5)                          # only the later layer's base differs
    if adapted:
        kasa.apply_kasa(other, r=2)
    before = snapshot(other)
    with pytest.raises(kasa.KaSAError, match="v_proj: the base weights differ"):
        kasa.load_kasa_state_dict(other, state)
    assert_unchanged(other, before)
    assert kasa.load_kasa_state_dict(model, state) == ["q_proj", "v_proj"]   # the good one still loads
