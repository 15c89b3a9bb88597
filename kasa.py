"""KaSA: Knowledge-aware Singular-value Adaptation (Wang et al., ICLR 2025), in one file.

Copy this file into your project; it needs nothing but torch.

For a frozen linear weight W (out x in, k = min(out, in)) and a rank r, KaSA does two things
(the paper's §3 and its Appendix A pseudocode, in the same order as the code below):

  1. Knowledge-based SVD truncation (§3.1). W = U Σ Vᵀ. Drop the r *smallest* singular
     triplets ("noisy, long-tail knowledge"); the frozen base becomes
         W_world = U[:, :k-r] Σ[:k-r] V[:, :k-r]ᵀ.
  2. Knowledge-aware singular-value adaptation (§3.2). Learn an update in SVD form,
         ΔW = ΔU diag(Δσ) ΔVᵀ          (here: kasa_B · diag(kasa_sigma) · kasa_A)
     scaled by α/r, so the adapted layer computes  y = W_world x + b + (α/r) ΔW x.
     ΔU starts at zero, so the model is unchanged (apart from step 1) at step 0.
  3. Training adds two regularizers to the task loss (Eq. 9-11):
         L = L_task + β · ‖Δσ‖²  +  γ · (‖ΔUᵀΔU − I_r‖²_F + ‖ΔVᵀΔV − I_r‖²_F)
  4. For inference, merge W_world + ΔW into one matrix: zero added latency.

Usage:

    import kasa
    names = kasa.apply_kasa(model, targets=("q_proj", "v_proj"), r=8, alpha=16)
    report = kasa.truncation_report(model, lambda: dev_loss(model))   # what did step 1 cost?
    print(kasa.format_truncation_report(report))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    for batch in loader:
        l2, l3 = kasa.kasa_regularization(model)
        loss = task_loss(model, batch) + 1e-4 * l2 + 1e-3 * l3
        loss.backward(); optimizer.step(); optimizer.zero_grad()
    torch.save(kasa.kasa_state_dict(model), "adapter.pt")     # small: adapter + dropped factors
    kasa.merge_kasa(model)                                      # W <- W_world + ΔW for inference

    # Later, on a fresh copy of the same pretrained model (no SVD is run again):
    kasa.load_kasa_state_dict(model, torch.load("adapter.pt", weights_only=True))

Public API: KaSALinear, apply_kasa, kasa_regularization, kasa_state_dict, load_kasa_state_dict,
merge_kasa, unmerge_kasa, lora_factors, truncation_report, format_truncation_report.

Where other implementations differ from the paper (this file follows the paper):
  * The official code (a PEFT fork, juyongjiang/KaSA) keeps `in_features - r` singular components
    instead of k - r. When out < in (e.g. a GQA k/v projection, 576 -> 192), k = out ≤ in - r,
    so nothing is dropped at all: those layers are silently never truncated.
  * Its orthogonality term uses the in x in matrix AᵀA and the out x out matrix BBᵀ (rank r, so
    their distance to I is at least √(d − r) and the term never reaches 0), takes the unsquared
    Frobenius norm, and divides the whole regularizer by the number of layers.
  * PEFT's KaSA variant uses the paper's r x r Gram matrices but sums *unsquared* norms.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "KaSALinear",
    "apply_kasa",
    "kasa_regularization",
    "kasa_state_dict",
    "load_kasa_state_dict",
    "merge_kasa",
    "unmerge_kasa",
    "lora_factors",
    "truncation_report",
    "format_truncation_report",
]


def svd_dtype(weight: torch.Tensor) -> torch.dtype:
    """The SVD and every adapter delta are computed in float32, or float64 for a float64 weight."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def truncate_minor_components(weight: torch.Tensor, r: int):
    """Knowledge-based SVD truncation (§3.1): split W into W_world and its r smallest triplets.

    Returns (W_world in weight's dtype, dropped_US: out x r, dropped_Vt: r x in), where
    W = W_world + dropped_US @ dropped_Vt. W_world is formed as W minus the dropped part
    rather than rebuilt from the k - r kept factors: the same matrix mathematically, but
    `W_world + dropped` then gives back W up to one rounding, which `restore_base` relies on.
    """
    W = weight.detach().to(svd_dtype(weight))
    if r == 0:                                             # truncation switched off: W_world = W
        return weight.detach().clone(), W.new_zeros(W.shape[0], 0), W.new_zeros(0, W.shape[1])
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)   # W = U diag(S) Vh, S descending
    k = S.shape[0]
    dropped_US = U[:, k - r:] * S[k - r:]                  # U[:, k-r:] Σ[k-r:]      (out, r)
    dropped_Vt = Vh[k - r:, :]                             # V[:, k-r:]ᵀ             (r, in)
    W_world = W - dropped_US @ dropped_Vt                  # U[:, :k-r] Σ[:k-r] V[:, :k-r]ᵀ
    return W_world.to(weight.dtype), dropped_US.contiguous(), dropped_Vt.contiguous()


def base_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """Two float64 numbers that identify a weight matrix: ‖W‖_F and uᵀWv for fixed random u, v.

    Saved with an adapter so that loading it onto a different base model fails loudly. The
    probes come from a fixed seed, so the fingerprint is the same on every machine.
    """
    generator = torch.Generator().manual_seed(20250122)
    u = torch.randn(weight.shape[0], generator=generator, dtype=torch.float64)
    v = torch.randn(weight.shape[1], generator=generator, dtype=torch.float64)
    W = weight.detach().to("cpu", torch.float64)
    return torch.stack([W.norm(), u @ W @ v])


class KaSALinear(nn.Module):
    """A frozen nn.Linear whose weight is W_world, plus a trainable update B · diag(σ) · A.

    Parameters and buffers (names are stable: they are the keys of `kasa_state_dict`):
      weight      (out, in)  frozen W_world, in the base model's dtype (same name as nn.Linear)
      bias        (out,)     frozen, unchanged (same name as nn.Linear)
      kasa_A      (r, in)    trainable ΔVᵀ, float32, kaiming-uniform as in LoRA
      kasa_B      (out, r)   trainable ΔU, float32, zeros so that ΔW = 0 at step 0
      kasa_sigma  (r,)       trainable Δσ (the knowledge-aware singular values), float32, N(0, 1)
      kasa_dropped_US (out, t), kasa_dropped_Vt (t, in)   buffers: the dropped triplets U_t Σ_t, V_tᵀ
      kasa_fingerprint (2,)  buffer: base_fingerprint of the original W

    The paper drops t = r triplets and trains σ. Two switches exist for ablations, and change
    nothing else: `truncation` sets t (0 switches step 1 off), and `learn_sigma=False` fixes
    σ = 1 (step 2 without knowledge-aware singular values). With both off the layer is LoRA.

    The adapter stays float32 when the base is bf16/fp16 (it is the optimizer's master copy);
    under autocast its matmuls run in the autocast dtype like every other layer's.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 truncation: int = None, learn_sigma: bool = True, dropped: tuple = None):
        super().__init__()
        weight = base.weight
        if weight.device.type == "meta":
            raise ValueError("KaSA needs real weights for its SVD, but this layer is on the meta device: "
                             "load the pretrained weights before calling apply_kasa.")
        if not weight.is_floating_point():
            raise ValueError(f"KaSA needs a floating-point weight, got {weight.dtype} (a quantized layer?): "
                             "load the model in float32/bfloat16/float16 first.")
        out_features, in_features = weight.shape
        k = min(out_features, in_features)
        if dropped is not None:
            truncation = dropped[1].shape[0]                        # a saved truncation (no SVD)
        elif truncation is None:
            truncation = r                                         # the paper: drop as many as the rank
        if r < 1 or not 0 <= truncation < k:
            raise ValueError(f"r={r} must satisfy 1 <= r < min(out, in) = {k} for a {out_features}x{in_features} "
                             f"weight (truncation={truncation}): KaSA drops r singular triplets and must keep "
                             "at least one.")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.scaling = alpha / r                                   # α/r, as in LoRA
        self.learn_sigma = learn_sigma
        self.merged = False

        # Step 1 (§3.1): knowledge-based SVD truncation, or the saved factors of an earlier one.
        if dropped is None:
            W_world, dropped_US, dropped_Vt = truncate_minor_components(weight, truncation)
        else:
            dropped_US, dropped_Vt = (t.to(weight.device, svd_dtype(weight)) for t in dropped)
            W_world = (weight.detach().to(svd_dtype(weight)) - dropped_US @ dropped_Vt).to(weight.dtype)
        self.weight = nn.Parameter(W_world, requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        self.register_buffer("kasa_dropped_US", dropped_US)
        self.register_buffer("kasa_dropped_Vt", dropped_Vt)
        self.register_buffer("kasa_fingerprint", base_fingerprint(weight).to(weight.device))

        # Step 2 (§3.2): the trainable update ΔW = ΔU diag(Δσ) ΔVᵀ = B diag(σ) A.
        factory = dict(device=weight.device, dtype=svd_dtype(weight))
        self.kasa_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.kasa_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        self.kasa_sigma = nn.Parameter(torch.randn(r, **factory) if learn_sigma else torch.ones(r, **factory),
                                       requires_grad=learn_sigma)
        nn.init.kaiming_uniform_(self.kasa_A, a=math.sqrt(5))     # LoRA's A init (nn.Linear's default)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)                    # W_world x + b
        if self.merged:
            return y                                               # ΔW is already inside weight
        # (α/r) B ((A x) ⊙ σ): multiply the r-dim activation by σ, never build diag(σ).
        # Folding α/r into σ scales r numbers instead of an out-dim activation.
        h = F.linear(self.dropout(x).to(self.kasa_A.dtype), self.kasa_A)   # A x        (..., r)
        h = h * (self.kasa_sigma * self.scaling)                            # ⊙ (α/r) σ  (..., r)
        return y + F.linear(h, self.kasa_B).to(y.dtype)                     # + B h      (..., out)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r) B diag(σ) A, in float32 (float64 for a float64 base)."""
        return (self.kasa_B * (self.kasa_sigma * self.scaling)) @ self.kasa_A

    @torch.no_grad()
    def merge(self):
        """weight <- W_world + ΔW (step 4): one matmul per layer at inference, zero added latency."""
        if self.merged:
            raise RuntimeError("this KaSALinear is already merged")
        self.weight.copy_((self.weight.to(self.kasa_A.dtype) + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """weight <- weight − ΔW, to train again. Exact in float32; in bf16 it rounds twice."""
        if not self.merged:
            raise RuntimeError("this KaSALinear is not merged")
        self.weight.copy_((self.weight.to(self.kasa_A.dtype) - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    @torch.no_grad()
    def restore_base(self) -> nn.Linear:
        """The original pretrained layer, W = W_world + U_r Σ_r V_rᵀ, as a new nn.Linear (no adapter)."""
        W_world = self.weight.to(self.kasa_A.dtype)
        if self.merged:
            W_world = W_world - self.delta_weight()
        W = W_world + self.kasa_dropped_US @ self.kasa_dropped_Vt
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        layer.weight.copy_(W)
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"truncation={self.kasa_dropped_Vt.shape[0]}, learn_sigma={self.learn_sigma}, "
                f"scaling={self.scaling:g}, merged={self.merged}")


def _kasa_layers(model: nn.Module):
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, KaSALinear)]
    if not layers:
        raise ValueError("the model has no KaSA layers: call kasa.apply_kasa(model, ...) first")
    return layers


def _replace_module(model: nn.Module, name: str, new: nn.Module):
    new.train(model.get_submodule(name).training)   # a new module would otherwise be in train mode
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def _freeze_all_but_kasa(model: nn.Module):
    for param in model.parameters():
        param.requires_grad = False
    for _, layer in _kasa_layers(model):
        layer.kasa_A.requires_grad = layer.kasa_B.requires_grad = True
        layer.kasa_sigma.requires_grad = layer.learn_sigma


def apply_kasa(model: nn.Module, targets=("q_proj", "v_proj"), r: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, *, truncation: int = None, learn_sigma: bool = True) -> list:
    """Replace every nn.Linear whose qualified name ends with one of `targets` by a KaSALinear.

    Everything else is frozen; only kasa_A, kasa_B and kasa_sigma train. Returns the replaced names.
    `truncation` and `learn_sigma` are ablation switches (see KaSALinear); the defaults are the paper's.
    """
    if isinstance(targets, str):
        targets = (targets,)
    matched = [(name, m) for name, m in model.named_modules()
               if any(name == t or name.endswith("." + t) for t in targets)]
    if not matched:
        linear_names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no module name ends with any of targets={list(targets)}; "
                         f"the model's nn.Linear layers are named: {linear_names}")
    for name, module in matched:
        if isinstance(module, KaSALinear):
            raise ValueError(f"{name} is already a KaSALinear: apply_kasa was called twice on this model")
        if type(module) is not nn.Linear:
            raise TypeError(f"target {name} is a {type(module).__name__}, not an nn.Linear: KaSA adapts linear "
                            "layers only (GPT-2's fused Conv1D must be split into q/k/v nn.Linear first)")
    for name, module in matched:
        _replace_module(model, name, KaSALinear(module, r=r, alpha=alpha, dropout=dropout,
                                                truncation=truncation, learn_sigma=learn_sigma))
    _freeze_all_but_kasa(model)
    return [name for name, _ in matched]


def kasa_regularization(model: nn.Module):
    """(L2, L3) summed over all KaSA layers, in float32 (Eq. 9 and 10). Loss = task + β·L2 + γ·L3 (Eq. 11).

    L2 = Σ_layers ‖Δσ‖²                                   singular values stay small
    L3 = Σ_layers ‖BᵀB − I_r‖²_F + ‖AAᵀ − I_r‖²_F          ΔU, ΔV stay (semi-)orthogonal, so that
                                                          B diag(σ) A really is an SVD
    ΔV = Aᵀ, so ΔVᵀΔV = AAᵀ. Both Gram matrices are r x r: cheap, unlike the official code's d x d ones.
    """
    l2 = l3 = 0.0
    for _, layer in _kasa_layers(model):
        A, B, sigma = layer.kasa_A.float(), layer.kasa_B.float(), layer.kasa_sigma.float()
        eye = torch.eye(layer.r, device=A.device)
        l2 = l2 + sigma.square().sum()
        l3 = l3 + (B.T @ B - eye).square().sum() + (A @ A.T - eye).square().sum()
    return l2, l3


def kasa_state_dict(model: nn.Module) -> dict:
    """The adapter: trainable factors, dropped triplets and base fingerprint of every KaSA layer.

    Plain tensors keyed `<layer>.<name>`, so torch.save and safetensors both store it. Also
    holds `<layer>.kasa_alpha` and `<layer>.kasa_learn_sigma`, so the adapter reloads with the
    scaling and the trainable set it was trained with.
    """
    state = {}
    for name, layer in _kasa_layers(model):
        for key, tensor in layer.state_dict().items():
            if key.startswith("kasa_"):
                state[f"{name}.{key}"] = tensor.detach().clone()
        state[f"{name}.kasa_alpha"] = torch.tensor(layer.scaling * layer.r, dtype=torch.float64)
        state[f"{name}.kasa_learn_sigma"] = torch.tensor(layer.learn_sigma)
    return state


ADAPTER_KEYS = ("kasa_A", "kasa_B", "kasa_sigma", "kasa_dropped_US", "kasa_dropped_Vt",
                "kasa_fingerprint", "kasa_alpha", "kasa_learn_sigma")


@torch.no_grad()
def load_kasa_state_dict(model: nn.Module, state: dict, dropout: float = 0.0) -> list:
    """Load an adapter from kasa_state_dict into `model`, with no SVD.

    `model` is either the plain pretrained model (its target nn.Linear layers are replaced)
    or one that already went through apply_kasa with the same targets (they are reset onto
    the saved truncation). The original weights must match the adapter's fingerprints.
    Dropout is not part of the adapter: pass it to continue training. Returns the layer names.
    """
    by_layer = {}
    for key, tensor in state.items():
        layer_name, _, param = key.rpartition(".")
        if param not in ADAPTER_KEYS:
            raise KeyError(f"unexpected key {key!r} in a KaSA state dict (known names: {ADAPTER_KEYS})")
        by_layer.setdefault(layer_name, {})[param] = tensor
    missing = [f"{n}.{p}" for n, tensors in by_layer.items() for p in ADAPTER_KEYS if p not in tensors]
    if missing:
        raise KeyError(f"the KaSA state dict is missing tensors: {missing}")
    modules = dict(model.named_modules())
    absent = [n for n in by_layer if n not in modules]
    if absent:
        raise KeyError(f"the adapter has layers that this model lacks: {absent}; is it the right architecture?")
    extra = sorted(n for n, m in modules.items() if isinstance(m, KaSALinear) and n not in by_layer)
    if extra:
        raise KeyError(f"the model has KaSA layers that the adapter lacks: {extra}")

    for name, tensors in by_layer.items():
        module = modules[name]
        base = module.restore_base() if isinstance(module, KaSALinear) else module
        if type(base) is not nn.Linear:
            raise TypeError(f"{name} is a {type(base).__name__}, not an nn.Linear")
        expected = tuple(tensors["kasa_dropped_US"].shape[:1] + tensors["kasa_dropped_Vt"].shape[1:])
        if tuple(base.weight.shape) != expected:
            raise ValueError(f"{name}: the adapter was made for a {expected[0]}x{expected[1]} weight, "
                             f"the model has {tuple(base.weight.shape)}")
        saved, actual = tensors["kasa_fingerprint"].double().cpu(), base_fingerprint(base.weight)
        # Both numbers have the scale of ‖W‖_F; bf16 rounding moves them by ~‖W‖_F / 500.
        if not torch.all((saved - actual).abs() <= 1e-2 * saved[0]):
            raise ValueError(f"{name}: the base weights differ from those the adapter was trained on "
                             f"(fingerprint {actual.tolist()} vs saved {saved.tolist()}): load the same "
                             "pretrained checkpoint in the same precision before loading the adapter")
        r = tensors["kasa_sigma"].shape[0]
        layer = KaSALinear(base, r=r, alpha=float(tensors["kasa_alpha"]), dropout=dropout,
                           learn_sigma=bool(tensors["kasa_learn_sigma"]),
                           dropped=(tensors["kasa_dropped_US"], tensors["kasa_dropped_Vt"]))
        for param in ("kasa_A", "kasa_B", "kasa_sigma"):
            getattr(layer, param).copy_(tensors[param])
        _replace_module(model, name, layer)
    _freeze_all_but_kasa(model)
    return list(by_layer)


def merge_kasa(model: nn.Module):
    """Merge every KaSA layer for inference: weight = W_world + ΔW."""
    for _, layer in _kasa_layers(model):
        layer.merge()


def unmerge_kasa(model: nn.Module):
    """Undo merge_kasa, e.g. to continue training."""
    for _, layer in _kasa_layers(model):
        layer.unmerge()


@torch.no_grad()
def lora_factors(layer: KaSALinear):
    """The layer's fine-tuned weight as a plain LoRA update of the ORIGINAL weight: (B_total, A_total).

        W_world + ΔW = W + B_total A_total,   W = W_world + U_t Σ_t V_tᵀ (the pretrained weight)
        B_total = [(α/r) B diag(σ), −U_t Σ_t]   (out, r + t)
        A_total = [A; V_tᵀ]                     (r + t, in)

    The second block takes the t dropped triplets back out, so any LoRA runtime (PEFT, vLLM, ...)
    serves a KaSA adapter on the untouched base with scaling 1. In float32 (float64 for a float64
    base); merged or not, the result is the same.
    """
    B_scaled = layer.kasa_B * (layer.kasa_sigma * layer.scaling)
    B_total = torch.cat([B_scaled, -layer.kasa_dropped_US.to(B_scaled.dtype)], dim=1)
    A_total = torch.cat([layer.kasa_A, layer.kasa_dropped_Vt.to(B_scaled.dtype)], dim=0)
    return B_total, A_total


# --- What did the truncation cost? (a report to read before training)
#
# Step 1 rests on a claim about the pretrained model: its smallest singular triplets are noise.
# The claim can be checked before training. Right after apply_kasa the adapter is a zero update
# (B = 0), so any change in the loss is the truncation's alone. The claim does not always hold: in
# some models one tiny direction of one layer carries real knowledge. The report shows it; what
# to do about it is the user's call, so it never changes the method.


@torch.no_grad()
def truncation_report(model: nn.Module, compute_loss, warn_above: float = 0.05) -> dict:
    """What step 1 dropped from each KaSA layer of a model fresh from apply_kasa, and what it costs.

    `compute_loss()` returns the model's mean loss on a few fixed batches (the same ones on every
    call). It runs once with every layer truncated, once with every layer restored, and once per
    truncated layer, in eval mode. Returns a dict that json.dumps can write:
      loss_original   every layer restored to the pretrained W = W_world + U_t Σ_t V_tᵀ
      loss_truncated  every layer W_world: where training starts
      layers          worst first, one dict per layer:
        name, truncation   the layer and t, the number of triplets it dropped
        dropped_sigma      σ_{k-t+1..k}: the column norms of U_t Σ_t (U's columns are unit vectors)
        energy_share       Σσ²_dropped / ‖W‖²_F, where ‖W‖²_F = ‖W_world‖²_F + Σσ²_dropped
        delta_loss         the loss with only this layer truncated, minus loss_original
        kept_sigma         the singular values of W_world, to 5 significant digits (for plots)
      warning         None, or what to do when truncation raises the loss by more than warn_above nats
    Each measurement swaps weight Parameters in and out instead of adding and subtracting the
    dropped part, so the model ends up with its own Parameters again, bit for bit, in any dtype.
    """
    layers = _kasa_layers(model)
    trained = [name for name, layer in layers if layer.kasa_B.any()]
    if trained:
        raise ValueError(f"{trained[0]} (and {len(trained) - 1} more layers) has a trained adapter (kasa_B != 0), "
                         "so the loss would mix training with truncation: call truncation_report right after "
                         "apply_kasa, before the first optimizer step")
    modules = dict(layers)
    truncated = {name: layer.weight for name, layer in layers}
    original = {name: nn.Parameter(layer.restore_base().weight, requires_grad=False) for name, layer in layers}

    def use(weights: dict):
        for name, weight in weights.items():
            modules[name].weight = weight

    was_training = model.training
    model.eval()
    delta_loss = {}
    try:
        loss_truncated = float(compute_loss())
        use(original)
        loss_original = float(compute_loss())
        for name, layer in layers:
            if layer.kasa_dropped_Vt.shape[0] > 0:           # truncation 0: nothing dropped, Δloss = 0
                use({name: truncated[name]})
                delta_loss[name] = float(compute_loss()) - loss_original
                use({name: original[name]})
    finally:
        use(truncated)
        model.train(was_training)

    rows = []
    for name, layer in layers:
        dropped_sigma = layer.kasa_dropped_US.double().norm(dim=0)
        dropped_energy = dropped_sigma.square().sum().item()
        W_world = layer.weight.to(svd_dtype(layer.weight))
        kept_sigma = torch.linalg.svdvals(W_world)[:min(W_world.shape) - dropped_sigma.numel()]
        rows.append({"name": name, "truncation": dropped_sigma.numel(), "dropped_sigma": dropped_sigma.tolist(),
                     "energy_share": dropped_energy / (W_world.double().square().sum().item() + dropped_energy),
                     "delta_loss": delta_loss.get(name, 0.0),
                     "kept_sigma": [float(f"{s:.5g}") for s in kept_sigma.tolist()]})
    rows.sort(key=lambda row: -row["delta_loss"])
    increase = loss_truncated - loss_original
    return {"loss_original": loss_original, "loss_truncated": loss_truncated, "layers": rows,
            "warning": _truncation_warning(rows, increase, warn_above) if increase > warn_above else None}


def _truncation_warning(rows: list, increase: float, warn_above: float) -> str:
    """Name the worst layers and the ways out: adapt only the harmless projections, or do not truncate."""
    by_kind = {}                                           # Δloss summed per projection (q_proj, v_proj, ...)
    for row in rows:
        kind = row["name"].rpartition(".")[2]
        by_kind[kind] = by_kind.get(kind, 0.0) + row["delta_loss"]
    harmless = sorted(kind for kind, delta in by_kind.items() if delta <= warn_above)
    harmful = sorted(set(by_kind) - set(harmless))
    retarget = (f"adapt only {','.join(harmless)} (train.py --targets {','.join(harmless)}), or adapt "
                f"{','.join(harmful)} without truncation (train.py --untruncated-targets {','.join(harmful)}), or "
                if 0 < len(harmless) < len(by_kind) else "")
    worst = [row for row in rows if row["delta_loss"] > 0][:3]
    return (f"truncation raises the loss by {increase:+.3f} nats before training (per projection: "
            + ", ".join(f"{kind} {delta:+.3f}" for kind, delta in sorted(by_kind.items()))
            + "; worst layers: " + (", ".join(f"{row['name']} {row['delta_loss']:+.3f}" for row in worst) or "none alone")
            + f"). Their smallest singular directions are not noise for this model. To keep them, {retarget}"
            "switch truncation off (apply_kasa(..., truncation=0); train.py --truncation 0). "
            "KaSA still runs as configured.")


def format_truncation_report(report: dict, top: int = 10) -> str:
    """The report as a plain-text table, worst layers first, then the totals and any warning."""
    rows = report["layers"]
    width = max(len("layer"), *(len(row["name"]) for row in rows[:top]))
    lines = ["KaSA truncation report (Δloss: the loss change when only that layer is truncated)",
             f"{'layer':<{width}}  {'dropped σ (count)':<22}  {'energy':>9}  {'Δloss':>8}"]
    for row in rows[:top]:
        sigma = row["dropped_sigma"]
        dropped = ("none (truncation 0)" if not sigma else f"{sigma[0]:.3g}" if len(sigma) == 1
                   else f"{sigma[0]:.3g} .. {sigma[-1]:.3g} ({len(sigma)})")
        lines.append(f"{row['name']:<{width}}  {dropped:<22}  {100 * row['energy_share']:>8.2g}%  "
                     f"{row['delta_loss']:>+8.4f}")
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} more layers")
    lines.append(f"loss {report['loss_original']:.4f} (original) -> {report['loss_truncated']:.4f} (truncated), "
                 f"{report['loss_truncated'] - report['loss_original']:+.4f}; the per-layer Δloss add up to "
                 f"{sum(row['delta_loss'] for row in rows):+.4f}")
    if report["warning"]:
        lines.append("WARNING: " + report["warning"])
    return "\n".join(lines)


def _self_test():
    """`python kasa.py`: check the method's invariants on a small random model and print them."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(48, 32))
    model.add_module("v_proj", nn.Linear(32, 48, bias=False))
    x = torch.randn(4, 48, dtype=torch.float64)
    model.double()
    original = {n: m.weight.detach().clone() for n, m in model.named_children()}

    def run(m):
        return m.v_proj(m.q_proj(x))

    names = apply_kasa(model, targets=("q_proj", "v_proj"), r=4, alpha=8)
    for name in names:
        layer = model.get_submodule(name)
        W, W_world = original[name], layer.weight
        dropped = torch.linalg.svdvals(W)[-4:]
        assert torch.linalg.matrix_rank(W_world) == min(W.shape) - 4
        assert torch.allclose((W - W_world).norm(), dropped.norm())
        print(f"ok  {name}: rank(W_world) = k - r = {min(W.shape) - 4}, ‖W − W_world‖_F = ‖σ_dropped‖ "
              f"= {dropped.norm():.4f}")
    q, v = model.q_proj, model.v_proj
    assert torch.equal(run(model), F.linear(F.linear(x, q.weight, q.bias), v.weight))
    print("ok  at init ΔW = 0: the output equals W_world x + b exactly")

    for layer in model.children():
        layer.kasa_B.data.normal_()
    before = run(model)
    merge_kasa(model)
    assert torch.allclose(run(model), before, atol=1e-10)
    unmerge_kasa(model)
    assert torch.allclose(run(model), before, atol=1e-10)
    print("ok  merged forward == unmerged forward, and unmerge undoes merge")
    for name in names:
        assert torch.allclose(model.get_submodule(name).restore_base().weight, original[name], atol=1e-12)
    print("ok  restore_base gives back the original W (float64, within 1e-12)")
    l2, l3 = kasa_regularization(model)
    print(f"ok  regularizer: L2 = {l2.item():.3f}, L3 = {l3.item():.3f}")


if __name__ == "__main__":
    _self_test()
