"""KaSA: Knowledge-aware Singular-value Adaptation (Wang et al., ICLR 2025), in one file.

Copy this file into your project; it needs nothing but torch.

For a frozen linear weight W (out x in, k = min(out, in)) and a rank r, KaSA does four things
(the paper's §3 and its Appendix A pseudocode), and this file implements them in that order:

  1. Knowledge-based SVD truncation (§3.1): W = U Σ Vᵀ. Drop the r *smallest* singular
     triplets ("noisy, long-tail knowledge"); the frozen base becomes
         W_world = U[:, :k-r] Σ[:k-r] V[:, :k-r]ᵀ.                      -> truncate_minor_components
  2. Knowledge-aware singular-value adaptation (§3.2): learn an update in SVD form,
         ΔW = ΔU diag(Δσ) ΔVᵀ          (here: kasa_B · diag(kasa_sigma) · kasa_A)
     scaled by α/r, so the adapted layer computes  y = W_world x + b + (α/r) ΔW x.
     ΔU starts at zero, so the model is unchanged (apart from step 1) at step 0.  -> KaSALinear.forward
  3. Training adds two regularizers to the task loss (Eq. 9-11):
         L = L_task + β · ‖Δσ‖²  +  γ · (‖ΔUᵀΔU − I_r‖²_F + ‖ΔVᵀΔV − I_r‖²_F)  -> kasa_regularization
  4. For inference, merge W_world + ΔW into one matrix: zero added latency.    -> KaSALinear.merge

After them, past a marked divider: saving and loading an adapter, LoRA export, an optional
data-aware criterion for step 1 (not the paper's: apply_kasa(..., truncation_criterion='activation',
calibration=collect_input_statistics(...)) drops the triplets adding the least output energy on
real inputs), and an optional report of what step 1 cost (truncation_report).

Usage:

    import kasa
    names = kasa.apply_kasa(model, targets=("q_proj", "v_proj"), r=8, alpha=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    for batch in loader:
        l2, l3 = kasa.kasa_regularization(model)
        loss = task_loss(model, batch) + 1e-4 * l2 + 1e-3 * l3
        loss.backward(); optimizer.step(); optimizer.zero_grad()
    torch.save(kasa.kasa_state_dict(model), "adapter.pt")     # small: adapter + dropped factors
    kasa.merge_kasa(model)                                      # W <- W_world + ΔW for inference

    # Later, on a fresh copy of the same pretrained model (no SVD is run again):
    kasa.load_kasa_state_dict(model, torch.load("adapter.pt", weights_only=True))

Targets are nn.Linear layers, or Hugging Face GPT-2's Conv1D (weight stored in x out; its fused
c_attn is adapted as one 3d x d matrix). Bad input raises kasa.KaSAError (a ValueError) saying
what is wrong and how to fix it, and leaves the model as it was.

Where other implementations differ from the paper (this file follows the paper):
  * The official code (a PEFT fork, juyongjiang/KaSA) keeps `in_features - r` singular components
    instead of k - r. When out < in (e.g. a GQA k/v projection, 576 -> 192), k = out ≤ in - r,
    so nothing is dropped at all: those layers are silently never truncated.
  * Its orthogonality term uses the in x in matrix AᵀA and the out x out matrix BBᵀ (rank r, so
    their distance to I is at least √(d − r) and the term never reaches 0), takes the unsquared
    Frobenius norm, and divides the whole regularizer by the number of layers.
  * PEFT's KaSA variant uses the paper's r x r Gram matrices but sums *unsquared* norms, and
    rejects GPT-2's Conv1D layers.
  * Both run a full SVD for step 1; this file computes only the r smallest triplets (see
    truncate_minor_components), to the same accuracy.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "KaSAError",
    "KaSALinear",
    "apply_kasa",
    "collect_input_statistics",
    "kasa_regularization",
    "kasa_state_dict",
    "load_kasa_state_dict",
    "merge_kasa",
    "unmerge_kasa",
    "lora_factors",
    "truncation_report",
    "format_truncation_report",
]


class KaSAError(ValueError):
    """Bad input to this file's API: the message says what is wrong and how to fix it."""


class KaSAKeyError(KaSAError, KeyError):
    """A KaSA state dict with missing or unknown keys, or layers the model lacks."""

    def __str__(self):                      # KeyError would print the message in quotes
        return str(self.args[0])


class KaSATypeError(KaSAError, TypeError):
    """A target module that KaSA cannot adapt."""


class KaSAStateError(KaSAError, RuntimeError):
    """merge on a merged layer, unmerge on an unmerged one."""


def svd_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dropped factors and every adapter delta are float32, or float64 for a float64 weight."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


# =============================================================================================
# Step 1 (§3.1): knowledge-based SVD truncation


def _vectors_space(W: torch.Tensor) -> torch.Tensor:
    """M with W's singular values and the smaller side as columns: W (out ≥ in) or Wᵀ (out < in).

    MᵀM is then the smaller Gram matrix (k x k), whose eigenvectors are M's right singular vectors."""
    return W if W.shape[0] >= W.shape[1] else W.T


def _triplets_from_vectors(W: torch.Tensor, X: torch.Tensor):
    """(U_r Σ_r, V_rᵀ) from the r singular vectors X (k x r, orthonormal) of the smaller side.

    out ≥ in: X = V_r and U_r Σ_r = W V_r.  out < in: X = U_r, V_rᵀ = (Wᵀ U_r)ᵀ / σ, σ = ‖Wᵀu‖.
    Returns None when a dropped σ is 0 (V_r is then undefined from U_r); the caller runs the SVD."""
    product = _vectors_space(W) @ X                          # M X: its column norms are σ
    if W.shape[0] >= W.shape[1]:
        return product, X.T
    sigma = product.norm(dim=0)
    if not bool(torch.all(sigma > 0)):
        return None
    return X * sigma, (product / sigma).T


def _smallest_by_svd(W: torch.Tensor, r: int):
    """The full SVD W = U diag(S) Vᵀ (S descending), then its last r triplets (§3.1 as written).
    In W's dtype: float32 (as PEFT) for float32/bf16/fp16 weights, float64 for float64 ones."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = S.shape[0]
    return U[:, k - r:] * S[k - r:], Vh[k - r:, :]           # U_r Σ_r (out, r), V_rᵀ (r, in)


def _smallest_by_gram(W: torch.Tensor, r: int):
    """The r smallest eigenvectors of the smaller Gram matrix MᵀM (k x k) in float64.

    σ_i² are MᵀM's eigenvalues. Squaring W costs accuracy only below √eps64 ≈ 1e-8 of ‖W‖,
    under float32's own rounding of W, and a symmetric eigensolver is cheaper than an SVD."""
    M = _vectors_space(W)
    _, vectors = torch.linalg.eigh(M.T @ M)                  # ascending eigenvalues
    return _triplets_from_vectors(W, vectors[:, :r].flip(1))  # σ_{k-r+1} ≥ ... ≥ σ_k, as the SVD


def _gram_solver(M: torch.Tensor):
    """x -> (MᵀM)⁻¹ x, from an LU of M (square) or a Cholesky of MᵀM; None if M is singular."""
    if M.shape[0] == M.shape[1]:
        LU, pivots, info = torch.linalg.lu_factor_ex(M)
        if info.item() != 0:
            return None
        return lambda X: torch.linalg.lu_solve(LU, pivots, torch.linalg.lu_solve(LU, pivots, X, adjoint=True))
    L, info = torch.linalg.cholesky_ex(M.T @ M)
    if info.item() != 0:
        return None
    return lambda X: torch.cholesky_solve(X, L)


def _smallest_by_subspace_iteration(W: torch.Tensor, r: int, rtol: float = 1e-8, max_iter: int = 60):
    """Only the r smallest triplets: inverse subspace iteration on MᵀM with a Rayleigh-Ritz step.

    A block of m = 2r + 8 vectors is multiplied by (MᵀM)⁻¹, which amplifies the smallest σ most
    (the error shrinks by (σ_r / σ_{m+1})² per step), re-orthonormalized, and rotated onto the
    Ritz vectors of MᵀM in its span. It stops when the dropped part W X Xᵀ is within rtol ‖W‖_F
    of the exact one (1e-8: below float32's rounding of W), by the sin θ bound ‖R‖_F / (θ_{r+1} − θ_r)
    on the angle to the exact subspace, R = MᵀM X_r − X_r Θ_r. It returns None (the caller then
    runs the SVD) if M is singular, or if that bound, extrapolated at its current rate of decrease,
    would not be met within max_iter steps: never an inexact result. float64 throughout."""
    M = _vectors_space(W)
    k = M.shape[1]
    solve = _gram_solver(M)
    if solve is None:
        return None
    generator = torch.Generator(device=W.device).manual_seed(20250122)
    X = torch.randn(k, min(k, 2 * r + 8), generator=generator, device=W.device, dtype=W.dtype)
    target, previous = rtol * W.norm(), None
    for step in range(max_iter):
        X = torch.linalg.qr(solve(X)).Q                       # inverse iteration, re-orthonormalized
        MX = M @ X
        theta, rotation = torch.linalg.eigh(MX.T @ MX)       # Rayleigh-Ritz: Xᵀ MᵀM X = Q Θ Qᵀ
        X, MX = X @ rotation, MX @ rotation                   # Ritz vectors, θ ascending
        residual = (M.T @ MX[:, :r] - X[:, :r] * theta[:r]).norm()
        if not bool(torch.isfinite(residual)):                # M nearly singular: the solves overflowed
            return None
        gap = (theta[r] - theta[r - 1]).clamp_min(torch.finfo(W.dtype).tiny)
        error = residual / gap * theta[r].sqrt()              # ‖Δ(W X Xᵀ)‖ ≲ sin θ · σ_{r+1}
        if error <= target:
            return _triplets_from_vectors(W, X[:, :r].flip(1))
        if step >= 4 and error * (error / previous).clamp(max=1) ** (max_iter - step) > target:
            return None                                       # converging too slowly: the SVD is faster
        previous = error
    return None


TRUNCATION_METHODS = {"svd": _smallest_by_svd, "gram": _smallest_by_gram,
                      "subspace": _smallest_by_subspace_iteration}


def default_truncation_method(shape, dtype=torch.float32) -> str:
    """The fastest exact method for a weight of this shape (measured in bench/bench_kasa.py).

    Square weights get subspace iteration: their smallest σ fall towards 0 (a "hard edge"), so
    σ_r / σ_{m+1} is small and it converges in a few steps. Rectangular ones have a crowded tail
    (σ_r ≈ σ_{m+1}), where the smaller Gram matrix's eigendecomposition is faster. A float64
    weight gets the SVD: its result must be exact to float64 rounding, which the Gram matrix
    (it squares W) cannot promise."""
    if dtype == torch.float64:
        return "svd"
    return "subspace" if shape[0] == shape[1] else "gram"


def truncate_minor_components(weight: torch.Tensor, r: int, method: str = None):
    """Knowledge-based SVD truncation (§3.1): split W (out x in) into W_world and its r smallest triplets.

    Returns (W_world in weight's dtype, dropped_US: out x r, dropped_Vt: r x in) with
    W = W_world + dropped_US @ dropped_Vt. W_world is formed as W minus the dropped part rather
    than rebuilt from the k - r kept factors: the same matrix, but `W_world + dropped` then
    gives back W up to one rounding, which `restore_base` relies on. `method` is 'svd', 'gram'
    or 'subspace' (default: default_truncation_method); 'subspace' falls back to 'gram' when it
    does not converge, and both to the SVD where they cannot guarantee the result, so every
    method gives the same triplets.
    """
    W = weight.detach()
    if r == 0:                                                # truncation switched off: W_world = W
        empty = dict(device=W.device, dtype=svd_dtype(weight))
        return W.clone(), torch.zeros(W.shape[0], 0, **empty), torch.zeros(0, W.shape[1], **empty)
    method = method or default_truncation_method(W.shape, W.dtype)
    if method not in TRUNCATION_METHODS:
        raise KaSAError(f"unknown truncation method {method!r}: use one of {sorted(TRUNCATION_METHODS)}")
    W64 = W.to(torch.float64)
    if method == "svd":
        dropped = None
    elif method == "subspace":
        dropped = _smallest_by_subspace_iteration(W64, r, rtol=1e-13 if W.dtype == torch.float64 else 1e-8)
        if dropped is None and W.dtype != torch.float64:
            dropped = _smallest_by_gram(W64, r)              # no convergence: the next exact path
    else:
        dropped = TRUNCATION_METHODS[method](W64, r)
    if dropped is None:
        dropped = _smallest_by_svd(W.to(svd_dtype(weight)), r)
    # Factors in float32 (float64 for a float64 W), and W_world from them by the same formula as
    # KaSALinear uses when it loads saved factors: both give the same W_world, bit for bit.
    dropped_US, dropped_Vt = (t.to(svd_dtype(weight)).contiguous() for t in dropped)   # U_r Σ_r, V_rᵀ
    W_world = W.to(svd_dtype(weight)) - dropped_US @ dropped_Vt   # U[:, :k-r] Σ[:k-r] V[:, :k-r]ᵀ
    return W_world.to(weight.dtype), dropped_US, dropped_Vt


def base_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """Two float64 numbers that identify a weight matrix (out x in): ‖W‖_F and uᵀWv for fixed u, v.

    Saved with an adapter so that loading it onto a different base model fails loudly. The
    probes come from a fixed seed, so the fingerprint is the same on every machine.
    """
    generator = torch.Generator().manual_seed(20250122)
    u = torch.randn(weight.shape[0], generator=generator, dtype=torch.float64)
    v = torch.randn(weight.shape[1], generator=generator, dtype=torch.float64)
    W = weight.detach().to("cpu", torch.float64)
    return torch.stack([W.norm(), u @ W @ v])


# =============================================================================================
# Step 2 (§3.2): the adapted layer, y = W_world x + b + (α/r) B diag(σ) A x; step 4: merge


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face GPT-2's Conv1D, recognized without importing transformers: y = x W + b with a
    2-D weight stored (in, out) and an `nf` attribute equal to out."""
    weight = getattr(module, "weight", None)
    return (not isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1])


def out_in_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as an (out, in) matrix: nn.Linear's own, or a view of Conv1D's transpose."""
    return module.weight.T if is_conv1d(module) else module.weight


def check_target(name: str, module: nn.Module, r: int, truncation: int = None) -> KaSAError:
    """Why `module` cannot become a KaSALinear with rank r (and `truncation` dropped triplets), or None."""
    if isinstance(module, KaSALinear):
        return KaSAError(f"{name} is already a KaSALinear: apply_kasa was called twice on this model; "
                         "to start over, load the pretrained weights again")
    if type(module) is not nn.Linear and not is_conv1d(module):
        return KaSATypeError(f"target {name} is a {type(module).__name__}, not an nn.Linear (or GPT-2's Conv1D): "
                             "KaSA adapts linear layers only; choose targets=... that name linear layers")
    weight = module.weight
    if weight.device.type == "meta":
        return KaSAError(f"{name}: KaSA needs real weights for its SVD, but this layer is on the meta device: "
                         "load the pretrained weights before calling apply_kasa")
    if not weight.is_floating_point():
        return KaSAError(f"{name}: KaSA needs a floating-point weight, got {weight.dtype} (a quantized layer?): "
                         "load the model in float32/bfloat16/float16 first")
    out_features, in_features = out_in_weight(module).shape
    k = min(out_features, in_features)
    truncation = r if truncation is None else truncation     # the paper: drop as many as the rank
    if not 1 <= r or not 0 <= truncation < k:
        return KaSAError(f"{name}: r={r} must satisfy 1 <= r < min(out, in) = {k} for a {out_features}x{in_features} "
                         f"weight (truncation={truncation}): KaSA drops r singular triplets and must keep at least "
                         f"one; use a smaller r, or leave this layer out of targets=...")
    return None


class KaSALinear(nn.Module):
    """A frozen linear layer whose weight is W_world, plus a trainable update B · diag(σ) · A.

    Parameters and buffers (names are stable: they are the keys of `kasa_state_dict`):
      weight      (out, in)  frozen W_world, in the base model's dtype (same name as nn.Linear;
                             (in, out) for a GPT-2 Conv1D base, as Conv1D stores it)
      bias        (out,)     frozen, unchanged (same name as nn.Linear)
      kasa_A      (r, in)    trainable ΔVᵀ, float32, kaiming-uniform as in LoRA
      kasa_B      (out, r)   trainable ΔU, float32, zeros so that ΔW = 0 at step 0
      kasa_sigma  (r,)       trainable Δσ (the knowledge-aware singular values), float32, N(0, 1)
      kasa_dropped_US (out, t), kasa_dropped_Vt (t, in)   buffers: the dropped triplets U_t Σ_t, V_tᵀ
      kasa_dropped_index (t,)  buffer: their positions in W's σ-descending SVD (the paper: k-t .. k-1)
      kasa_fingerprint (2,)  buffer: base_fingerprint of the original W

    The paper drops t = r triplets and trains σ. Two switches exist for ablations, and change
    nothing else: `truncation` sets t (0 switches step 1 off), and `learn_sigma=False` fixes
    σ = 1 (step 2 without knowledge-aware singular values). With both off the layer is LoRA.
    `second_moment` (E[xxᵀ] of the layer's inputs, in x in) switches step 1 to the data-aware
    criterion, truncate_by_output_energy; `dropped` = (U_t Σ_t, V_tᵀ[, index]) loads a saved set.

    The adapter stays float32 when the base is bf16/fp16 (it is the optimizer's master copy);
    under autocast its matmuls run in the autocast dtype like every other layer's.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 truncation: int = None, learn_sigma: bool = True, dropped: tuple = None,
                 second_moment: torch.Tensor = None):
        super().__init__()
        if dropped is not None:
            truncation = dropped[1].shape[0]                        # a saved truncation (no SVD)
        problem = check_target("the layer", base, r, truncation)
        if problem is not None:
            raise problem
        self.fan_in_fan_out = is_conv1d(base)                       # weight stored (in, out), as Conv1D
        self.base_class = type(base)
        W = out_in_weight(base)
        self.out_features, self.in_features = W.shape
        self.r, self.scaling = r, alpha / r                         # α/r, as in LoRA
        self.learn_sigma = learn_sigma
        self.merged = False

        # Step 1 (§3.1): knowledge-based SVD truncation, or the saved factors of an earlier one.
        t, k = r if truncation is None else truncation, min(W.shape)
        index = torch.arange(k - t, k, device=W.device)             # the paper's: the t smallest σ
        if dropped is not None:
            dropped_US, dropped_Vt = (f.to(W.device, svd_dtype(W)) for f in dropped[:2])
            W_world = (W.detach().to(svd_dtype(W)) - dropped_US @ dropped_Vt).to(W.dtype)
            index = index if len(dropped) < 3 or dropped[2] is None else dropped[2]   # older adapters: σ
        elif second_moment is not None:
            W_world, dropped_US, dropped_Vt, index = truncate_by_output_energy(W, t, second_moment)
        else:
            W_world, dropped_US, dropped_Vt = truncate_minor_components(W, t)
        self.weight = nn.Parameter(W_world.T.contiguous() if self.fan_in_fan_out else W_world, requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        self.register_buffer("kasa_dropped_US", dropped_US)
        self.register_buffer("kasa_dropped_Vt", dropped_Vt)
        self.register_buffer("kasa_dropped_index", index.to(W.device, torch.int64))
        self.register_buffer("kasa_fingerprint", base_fingerprint(W).to(W.device))

        # Step 2 (§3.2): the trainable update ΔW = ΔU diag(Δσ) ΔVᵀ = B diag(σ) A.
        factory = dict(device=W.device, dtype=svd_dtype(W))
        self.kasa_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.kasa_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))      # ΔW = 0 at step 0
        self.kasa_sigma = nn.Parameter(torch.randn(r, **factory) if learn_sigma else torch.ones(r, **factory),
                                       requires_grad=learn_sigma)                      # Δσ ~ N(0, 1)
        nn.init.kaiming_uniform_(self.kasa_A, a=math.sqrt(5))     # LoRA's A init (nn.Linear's default)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def weight_out_in(self) -> torch.Tensor:
        """W_world (or, merged, W_world + ΔW) as an (out, in) matrix; a view for a Conv1D layout."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight_out_in(), self.bias)            # W_world x + b          (§3.1)
        if self.merged:
            return y                                                # ΔW is already inside weight (step 4)
        # (α/r) B ((A x) ⊙ σ)  (§3.2): multiply the r-dim activation by σ, never build diag(σ).
        # Folding α/r into σ scales r numbers instead of an out-dim activation.
        h = F.linear(self.dropout(x).to(self.kasa_A.dtype), self.kasa_A)   # A x        (..., r)
        h = h * (self.kasa_sigma * self.scaling)                            # ⊙ (α/r) σ  (..., r)
        return y + F.linear(h, self.kasa_B).to(y.dtype)                     # + B h      (..., out)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r) B diag(σ) A (§3.2), (out, in), in float32 (float64 for a float64 base)."""
        return (self.kasa_B * (self.kasa_sigma * self.scaling)) @ self.kasa_A

    @torch.no_grad()
    def merge(self):
        """weight <- W_world + ΔW (step 4): one matmul per layer at inference, zero added latency."""
        if self.merged:
            raise KaSAStateError("this KaSALinear is already merged: call unmerge() (or unmerge_kasa) first")
        W = self.weight_out_in()
        W.copy_((W.to(self.kasa_A.dtype) + self.delta_weight()).to(W.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """weight <- weight − ΔW, to train again. Not bit-exact: the subtraction rounds to the base
        dtype once more (after merge's rounding): ~1e-7 relative in float32, ~4e-3 in bf16."""
        if not self.merged:
            raise KaSAStateError("this KaSALinear is not merged: only a merged layer can be unmerged")
        W = self.weight_out_in()
        W.copy_((W.to(self.kasa_A.dtype) - self.delta_weight()).to(W.dtype))
        self.merged = False

    @torch.no_grad()
    def restore_base(self) -> nn.Module:
        """The original pretrained layer, W = W_world + U_t Σ_t V_tᵀ, as a new module of the base's
        class (nn.Linear, or Conv1D built as Conv1D(nf=out, nx=in)), without the adapter."""
        W_world = self.weight_out_in().to(self.kasa_A.dtype)
        if self.merged:
            W_world = W_world - self.delta_weight()
        W = W_world + self.kasa_dropped_US @ self.kasa_dropped_Vt
        if self.fan_in_fan_out:
            layer = self.base_class(self.out_features, self.in_features).to(self.weight.device, self.weight.dtype)
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device=self.weight.device, dtype=self.weight.dtype)
        out_in_weight(layer).copy_(W)
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"truncation={self.kasa_dropped_Vt.shape[0]}, learn_sigma={self.learn_sigma}, "
                f"scaling={self.scaling:g}, merged={self.merged}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else ""))


def _kasa_layers(model: nn.Module):
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, KaSALinear)]
    if not layers:
        raise KaSAError("the model has no KaSA layers: call kasa.apply_kasa(model, targets=..., r=...) first")
    return layers


def _replace_module(model: nn.Module, name: str, new: nn.Module):
    new.train(model.get_submodule(name).training)   # a new module would otherwise be in train mode
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def _replace_all_or_none(model: nn.Module, names: list, make_layer):
    """Replace each named module by make_layer(name, module); on any failure, put every original back."""
    originals = {name: model.get_submodule(name) for name in names}
    try:
        for name in names:
            _replace_module(model, name, make_layer(name, originals[name]))
    except BaseException:
        for name, module in originals.items():
            _replace_module(model, name, module)
        raise


def _freeze_all_but_kasa(model: nn.Module):
    for param in model.parameters():
        param.requires_grad = False
    for _, layer in _kasa_layers(model):
        layer.kasa_A.requires_grad = layer.kasa_B.requires_grad = True
        layer.kasa_sigma.requires_grad = layer.learn_sigma


def _raise_first_kind(problems: list):
    """One error listing every problem, of the first problem's kind (so KeyError/TypeError still match)."""
    if problems:
        shown = [str(p) for p in problems[:5]] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
        raise type(problems[0])("; ".join(shown))


def _target_names(model: nn.Module, targets) -> list:
    """The qualified names of the modules that end with one of `targets` (a name or a tuple of names)."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    matched = [name for name, _ in model.named_modules() if any(name == t or name.endswith("." + t) for t in targets)]
    if not matched:
        linear_names = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                               if isinstance(m, nn.Linear) or is_conv1d(m)})
        raise KaSAError(f"no module name ends with any of targets={list(targets)}; the model's linear layers "
                        f"are named: {linear_names}: pass some of those as apply_kasa(model, targets=...)")
    return matched


def apply_kasa(model: nn.Module, targets=("q_proj", "v_proj"), r: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, *, truncation: int = None, learn_sigma: bool = True,
               truncation_criterion: str = "sigma", calibration: dict = None) -> list:
    """Replace every nn.Linear (or GPT-2 Conv1D) whose qualified name ends with one of `targets` by a KaSALinear.

    Everything else is frozen; only kasa_A, kasa_B and kasa_sigma train. Returns the replaced names.
    `truncation` and `learn_sigma` are ablation switches (see KaSALinear); the defaults are the paper's.
    truncation_criterion: which triplets step 1 drops: 'sigma', the smallest σ (the paper), or
    'activation', the least output energy σ_i² v_iᵀ E[xxᵀ] v_i on calibration inputs (not in the
    paper; truncate_by_output_energy), with calibration = collect_input_statistics(...)'s dict.
    Every target is checked before any is replaced: on an error the model is left as it was.
    """
    if truncation_criterion not in TRUNCATION_CRITERIA:
        raise KaSAError(f"unknown truncation_criterion {truncation_criterion!r}: use one of {list(TRUNCATION_CRITERIA)}")
    if (calibration is not None) != (truncation_criterion == "activation"):
        raise KaSAError("calibration (E[xxᵀ] per layer) is what truncation_criterion='activation' ranks by, and only "
                        "it: pass both, or neither for the paper's criterion")
    matched = _target_names(model, targets)
    problems = [check_target(name, model.get_submodule(name), r, truncation) for name in matched]
    if calibration is not None:
        problems += [calibration_problem(name, out_in_weight(model.get_submodule(name)), calibration)
                     for name, problem in zip(matched, problems) if problem is None]
    _raise_first_kind([p for p in problems if p is not None])
    _replace_all_or_none(model, matched, lambda name, module: KaSALinear(
        module, r=r, alpha=alpha, dropout=dropout, truncation=truncation, learn_sigma=learn_sigma,
        second_moment=None if calibration is None else calibration[name]))
    _freeze_all_but_kasa(model)
    return matched


# =============================================================================================
# Step 3 (Eq. 9-11): the regularizers added to the task loss


def kasa_regularization(model: nn.Module):
    """(L2, L3) summed over all KaSA layers, in float32 (Eq. 9 and 10). Loss = task + β·L2 + γ·L3 (Eq. 11).

    L2 = Σ_layers ‖Δσ‖²                                   singular values stay small (Eq. 9)
    L3 = Σ_layers ‖BᵀB − I_r‖²_F + ‖AAᵀ − I_r‖²_F          ΔU, ΔV stay (semi-)orthogonal, so that
                                                          B diag(σ) A really is an SVD (Eq. 10)
    ΔV = Aᵀ, so ΔVᵀΔV = AAᵀ. Both Gram matrices are r x r: cheap, unlike the official code's d x d ones.
    """
    l2 = l3 = 0.0
    for _, layer in _kasa_layers(model):
        A, B, sigma = layer.kasa_A.float(), layer.kasa_B.float(), layer.kasa_sigma.float()
        eye = torch.eye(layer.r, device=A.device)
        l2 = l2 + sigma.square().sum()                                               # Eq. 9
        l3 = l3 + (B.T @ B - eye).square().sum() + (A @ A.T - eye).square().sum()    # Eq. 10
    return l2, l3


def merge_kasa(model: nn.Module):
    """Step 4: merge every KaSA layer for inference, weight = W_world + ΔW."""
    for _, layer in _kasa_layers(model):
        layer.merge()


def unmerge_kasa(model: nn.Module):
    """Undo merge_kasa, e.g. to continue training."""
    for _, layer in _kasa_layers(model):
        layer.unmerge()


# =============================================================================================
# Saving and loading an adapter, and LoRA export


def kasa_state_dict(model: nn.Module) -> dict:
    """The adapter: trainable factors, dropped triplets (and their SVD positions), base fingerprint.

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
                "kasa_fingerprint", "kasa_alpha", "kasa_learn_sigma", "kasa_dropped_index")
REQUIRED_KEYS = ADAPTER_KEYS[:8]          # adapters saved before kasa_dropped_index dropped the t smallest σ


def _adapter_by_layer(state: dict, model: nn.Module) -> dict:
    """{layer name: {key: tensor}}, after checking that the keys are complete and fit the model."""
    by_layer = {}
    for key, tensor in state.items():
        layer_name, _, param = str(key).rpartition(".")
        if param not in ADAPTER_KEYS:
            raise KaSAKeyError(f"unexpected key {key!r} in a KaSA state dict (known names: {ADAPTER_KEYS}): "
                               "pass the dict that kasa_state_dict returned, unchanged")
        by_layer.setdefault(layer_name, {})[param] = tensor
    if not by_layer:
        raise KaSAKeyError("the KaSA state dict is empty: pass the dict that kasa_state_dict returned")
    missing = [f"{n}.{p}" for n, tensors in by_layer.items() for p in REQUIRED_KEYS if p not in tensors]
    if missing:
        raise KaSAKeyError(f"the KaSA state dict is missing tensors: {missing}: the file is incomplete; "
                           "save it again with kasa_state_dict")
    modules = dict(model.named_modules())
    absent = [n for n in by_layer if n not in modules]
    if absent:
        raise KaSAKeyError(f"the adapter has layers that this model lacks: {absent}: load it onto the "
                           "architecture it was trained on")
    extra = sorted(n for n, m in modules.items() if isinstance(m, KaSALinear) and n not in by_layer)
    if extra:
        raise KaSAKeyError(f"the model has KaSA layers that the adapter lacks: {extra}: load the adapter onto "
                           "the plain pretrained model, or onto one adapted with the same targets")
    return by_layer


def _adapter_shape_problems(name: str, tensors: dict, out_features: int, in_features: int) -> list:
    """Every tensor of one layer's adapter against the base's out x in, the rank r and the truncation t."""
    if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        return [KaSAError(f"{name}: the adapter holds values that are not tensors: pass kasa_state_dict's dict")]
    r, t, k = tensors["kasa_sigma"].numel(), tensors["kasa_dropped_Vt"].shape[0], min(out_features, in_features)
    expected = {"kasa_A": (r, in_features), "kasa_B": (out_features, r), "kasa_sigma": (r,),
                "kasa_dropped_US": (out_features, t), "kasa_dropped_Vt": (t, in_features),
                "kasa_fingerprint": (2,), "kasa_alpha": (), "kasa_learn_sigma": (), "kasa_dropped_index": (t,)}
    problems = [KaSAError(f"{name}.{key} has shape {tuple(tensors[key].shape)}, but a rank-{r} adapter with "
                          f"truncation {t} of this {out_features}x{in_features} layer needs {shape}: the adapter "
                          "was made for another model or rank, or the file is corrupt")
                for key, shape in expected.items() if key in tensors and tuple(tensors[key].shape) != shape]
    if not 1 <= r or not 0 <= t < k:
        problems.append(KaSAError(f"{name}: rank {r} and truncation {t} must satisfy 1 <= r and 0 <= t < {k}: "
                                  "the adapter file is corrupt; save it again with kasa_state_dict"))
    index = tensors.get("kasa_dropped_index")
    if index is not None and not problems and (index.is_floating_point() or index.unique().numel() != t
                                               or (t and not 0 <= int(index.min()) <= int(index.max()) < k)):
        problems.append(KaSAError(f"{name}.kasa_dropped_index must be {t} distinct integers in [0, {k}), got "
                                  f"{index.tolist()[:8]}: the file is corrupt; save it again with kasa_state_dict"))
    for key in ADAPTER_KEYS[:7]:
        tensor = tensors[key]
        if not tensor.is_floating_point():
            problems.append(KaSAError(f"{name}.{key} is {tensor.dtype}, not floating point: the file is corrupt"))
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(KaSAError(f"{name}.{key} holds NaN or infinite values: the adapter diverged or the "
                                      "file is corrupt; load an earlier, finite adapter"))
    return problems


def _adapter_problems(name: str, module: nn.Module, tensors: dict):
    """(the pretrained base layer, every problem with loading `tensors` onto it), changing nothing."""
    base = module.restore_base() if isinstance(module, KaSALinear) else module
    if type(base) is not nn.Linear and not is_conv1d(base):
        return base, [KaSATypeError(f"{name} is a {type(base).__name__}, not an nn.Linear (or GPT-2's Conv1D): "
                                    "load the adapter onto the architecture it was trained on")]
    problem = check_target(name, base, 1, 0)
    if problem is not None:
        return base, [problem]
    out_features, in_features = out_in_weight(base).shape
    problems = _adapter_shape_problems(name, tensors, out_features, in_features)
    if problems:
        return base, problems
    saved, actual = tensors["kasa_fingerprint"].double().cpu(), base_fingerprint(out_in_weight(base))
    # Both numbers have the scale of ‖W‖_F; bf16 rounding moves them by ~‖W‖_F / 500.
    if not torch.all((saved - actual).abs() <= 1e-2 * saved[0]):
        problems.append(KaSAError(f"{name}: the base weights differ from those the adapter was trained on "
                                  f"(fingerprint {actual.tolist()} vs saved {saved.tolist()}): load the same "
                                  "pretrained checkpoint in the same precision before loading the adapter"))
    return base, problems


@torch.no_grad()
def load_kasa_state_dict(model: nn.Module, state: dict, dropout: float = 0.0) -> list:
    """Load an adapter from kasa_state_dict into `model`, with no SVD.

    `model` is either the plain pretrained model (its target layers are replaced) or one that
    already went through apply_kasa with the same targets (they are reset onto the saved
    truncation). The original weights must match the adapter's fingerprints. Every layer is
    checked (keys, base fingerprint, every shape against r, in and out, finite values) before
    any module changes: on an error the model is left as it was. Dropout is not part of the
    adapter: pass it to continue training. Returns the layer names.
    """
    by_layer = _adapter_by_layer(state, model)
    bases, problems = {}, []
    for name, tensors in by_layer.items():
        bases[name], layer_problems = _adapter_problems(name, model.get_submodule(name), tensors)
        problems += layer_problems
    _raise_first_kind(problems)

    def make_layer(name, _module):
        tensors = by_layer[name]
        layer = KaSALinear(bases[name], r=tensors["kasa_sigma"].numel(), alpha=float(tensors["kasa_alpha"]),
                           dropout=dropout, learn_sigma=bool(tensors["kasa_learn_sigma"]),
                           dropped=(tensors["kasa_dropped_US"], tensors["kasa_dropped_Vt"],
                                    tensors.get("kasa_dropped_index")))
        for param in ("kasa_A", "kasa_B", "kasa_sigma"):
            getattr(layer, param).copy_(tensors[param])
        return layer
    _replace_all_or_none(model, list(by_layer), make_layer)
    _freeze_all_but_kasa(model)
    return list(by_layer)


@torch.no_grad()
def lora_factors(layer: KaSALinear):
    """The layer's fine-tuned weight as a plain LoRA update of the ORIGINAL weight: (B_total, A_total).

        W_world + ΔW = W + B_total A_total,   W = W_world + U_t Σ_t V_tᵀ (the pretrained weight)
        B_total = [(α/r) B diag(σ), −U_t Σ_t]   (out, r + t)
        A_total = [A; V_tᵀ]                     (r + t, in)

    The second block takes the t dropped triplets back out, so any LoRA runtime (PEFT, vLLM, ...)
    serves a KaSA adapter on the untouched base with scaling 1. In float32 (float64 for a float64
    base); merged or not, the result is the same. Both are (out, in)-oriented, also for Conv1D.
    """
    B_scaled = layer.kasa_B * (layer.kasa_sigma * layer.scaling)
    B_total = torch.cat([B_scaled, -layer.kasa_dropped_US.to(B_scaled.dtype)], dim=1)
    A_total = torch.cat([layer.kasa_A, layer.kasa_dropped_Vt.to(B_scaled.dtype)], dim=0)
    return B_total, A_total


# =============================================================================================
# Optional: a data-aware truncation criterion (not the paper's)
#
# Step 1 assumes the smallest σ carry the least knowledge. What a triplet contributes to the
# layer's output on real inputs is σ_i² E[(v_iᵀx)²], not σ_i²: inputs may be concentrated along
# exactly the directions with small σ. truncation_criterion='activation' ranks by that instead.


TRUNCATION_CRITERIA = ("sigma", "activation")


def output_energy_scores(weight: torch.Tensor, second_moment: torch.Tensor):
    """(U, S, Vh, scores) of W = U diag(S) Vh in float64, score_i = σ_i² v_iᵀ E[xxᵀ] v_i = E[(σ_i v_iᵀx)²].

    score_i is the energy triplet i adds to the layer's output on the inputs E[xxᵀ] was measured on:
    the u_i are orthonormal, so E‖W_D x‖² = Σ_{i∈D} score_i for any set D of triplets, and dropping
    the r lowest scores removes the least output energy of all r-subsets. With white inputs
    (E[xxᵀ] ∝ I) score_i ∝ σ_i²: the paper's criterion. Runs a full SVD (the paper's step 1 does too)."""
    U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    C = second_moment.to(weight.device, torch.float64)
    return U, S, Vh, S.square() * ((Vh @ C) * Vh).sum(dim=1)


def truncate_by_output_energy(weight: torch.Tensor, r: int, second_moment: torch.Tensor):
    """Step 1 with a data-aware criterion (not the paper's): drop the r triplets whose scores
    (output_energy_scores) are lowest. Returns (W_world, dropped_US, dropped_Vt, index) as
    truncate_minor_components does, plus the dropped triplets' positions in the σ-descending SVD
    (ascending), W = W_world + dropped_US @ dropped_Vt to one rounding."""
    if r == 0:
        return (*truncate_minor_components(weight, 0), torch.zeros(0, dtype=torch.int64, device=weight.device))
    U, S, Vh, scores = output_energy_scores(weight, second_moment)
    index = scores.argsort()[:r].sort().values
    return (*_drop_triplets(weight, U, S, Vh, index), index)


def _drop_triplets(weight: torch.Tensor, U, S, Vh, index):
    """(W_world, dropped_US, dropped_Vt) for the triplets `index` of the SVD U diag(S) Vh of weight."""
    dropped_US = (U[:, index] * S[index]).to(svd_dtype(weight)).contiguous()
    dropped_Vt = Vh[index].to(svd_dtype(weight)).contiguous()
    W_world = weight.detach().to(svd_dtype(weight)) - dropped_US @ dropped_Vt
    return W_world.to(weight.dtype), dropped_US, dropped_Vt


def calibration_problem(name: str, weight: torch.Tensor, calibration) -> KaSAError:
    """Why `calibration` cannot be the (in x in) input second moment of the layer `name`, or None."""
    fix = "collect it with kasa.collect_input_statistics(model, targets, run_batches) before apply_kasa"
    moment = calibration.get(name) if isinstance(calibration, dict) else None
    in_features = weight.shape[1]
    if not isinstance(moment, torch.Tensor):
        return KaSAError(f"{name}: truncation_criterion='activation' needs calibration[{name!r}], E[xxᵀ] of the "
                         f"layer's inputs ({in_features}x{in_features}), but calibration has none: {fix}")
    if tuple(moment.shape) != (in_features, in_features) or not moment.is_floating_point():
        return KaSAError(f"{name}: calibration[{name!r}] is {tuple(moment.shape)} {moment.dtype}, but E[xxᵀ] of this "
                         f"layer's inputs is a floating-point {in_features}x{in_features} matrix: {fix}")
    if not bool(torch.isfinite(moment).all()):
        return KaSAError(f"{name}: calibration[{name!r}] holds NaN or infinite values: {fix}, on finite inputs")
    return None


@torch.no_grad()
def collect_input_statistics(model: nn.Module, targets, run_batches) -> dict:
    """E[xxᵀ] of the inputs of each layer `targets` names: {name: (in x in) float64}, for apply_kasa's
    truncation_criterion='activation'.

    run_batches() runs the model forward on a few calibration batches (say, the first training
    batches); forward hooks add x xᵀ over every input row the layer sees, so padding counts too
    (run unpadded sequences to leave it out). The model is in eval mode meanwhile (no dropout),
    and ends as it was, hooks removed. Cost: one in x in float64 matrix per layer on the layer's
    device, in² · 8 bytes, 128 MB at in = 4096, and one (rows x in)ᵀ(rows x in) product per call."""
    names = _target_names(model, targets)
    sums, counts = {}, dict.fromkeys(names, 0)

    def hook(name):
        def add(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] += x.shape[0]
        return add
    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    was_training = model.training
    model.eval()
    try:
        run_batches()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    unused = [name for name in names if counts[name] == 0]
    if unused:
        raise KaSAError(f"run_batches() sent no input through {unused[:3]} ({len(unused)} layers): it must run "
                        "the model forward on the calibration batches")
    return {name: sums[name] / counts[name] for name in names}


# =============================================================================================
# Optional: what did the truncation cost? (a report to read before training; not the method)
#
# Step 1 rests on a claim about the pretrained model: its smallest singular triplets are noise.
# The claim can be checked before training. Right after apply_kasa the adapter is a zero update
# (B = 0), so any change in the loss is the truncation's alone. The claim does not always hold: in
# some models one tiny direction of one layer carries real knowledge. The report shows it; what
# to do about it is the user's call, so it never changes the method.


def _measure_truncation_losses(model: nn.Module, layers: list, compute_loss, variants: dict) -> tuple:
    """(loss original, {label: (loss with every layer truncated that way, {layer: Δloss with only it
    truncated})}) for variants = {label: {layer: truncated weight Parameter}}. Weight Parameters are
    swapped in and out (a loss already measured with the same Parameters is not measured again), so
    the model ends with its own Parameters again, bit for bit."""
    modules = dict(layers)
    own = {name: layer.weight for name, layer in layers}
    original = {name: nn.Parameter(layer.restore_base().weight.detach(), requires_grad=False)
                for name, layer in layers}                   # in the layer's own layout
    measured = {}

    def loss_with(weights: dict) -> float:                   # `weights` in, every other layer original
        key = tuple(sorted((name, id(weight)) for name, weight in weights.items()))
        if key not in measured:
            for name, weight in {**original, **weights}.items():
                modules[name].weight = weight
            measured[key] = float(compute_loss())
        return measured[key]

    was_training = model.training
    model.eval()
    try:
        results = {label: loss_with(weights) for label, weights in variants.items()}
        loss_original = loss_with({})
        for label, weights in variants.items():              # truncation 0: nothing dropped, Δloss = 0
            results[label] = results[label], {name: loss_with({name: weights[name]}) - loss_original
                                               for name, layer in layers if layer.kasa_dropped_Vt.shape[0] > 0}
    finally:
        for name, weight in own.items():
            modules[name].weight = weight
        model.train(was_training)
    return loss_original, results


def _criteria_weights(layer: "KaSALinear", second_moment: torch.Tensor) -> dict:
    """{criterion: (W_world Parameter in the layer's layout, dropped index, share of E‖Wx‖² dropped)}
    for the layer's own t under each criterion; the layer's own Parameter where its set is the same."""
    base = layer.restore_base()
    W, t = out_in_weight(base), layer.kasa_dropped_Vt.shape[0]
    U, S, Vh, scores = output_energy_scores(W, second_moment)            # one SVD for both sets
    k = scores.numel()
    weights = {}
    for criterion, index in (("sigma", torch.arange(k - t, k, device=W.device)),
                             ("activation", scores.argsort()[:t].sort().values)):
        if torch.equal(index.cpu(), layer.kasa_dropped_index.cpu()):
            weight = layer.weight
        else:
            W_world = _drop_triplets(W, U, S, Vh, index)[0]
            weight = nn.Parameter(W_world.T.contiguous() if layer.fan_in_fan_out else W_world, requires_grad=False)
        weights[criterion] = weight, index.tolist(), (scores[index].sum() / scores.sum()).item()
    return weights


@torch.no_grad()
def truncation_report(model: nn.Module, compute_loss, warn_above: float = 0.05, calibration: dict = None) -> dict:
    """What step 1 dropped from each KaSA layer of a model fresh from apply_kasa, and what it costs.

    `compute_loss()` returns the model's mean loss on a few fixed batches (the same ones on every
    call). It runs once with every layer truncated, once with every layer restored, and once per
    truncated layer, in eval mode. Returns a dict that json.dumps can write:
      loss_original   every layer restored to the pretrained W = W_world + U_t Σ_t V_tᵀ
      loss_truncated  every layer W_world: where training starts
      layers          worst first, one dict per layer:
        name, truncation   the layer and t, the number of triplets it dropped
        dropped_sigma      the dropped σ: the column norms of U_t Σ_t (U's columns are unit vectors)
        dropped_index      their positions in W's σ-descending SVD (k-t .. k-1 for the paper's criterion)
        energy_share       Σσ²_dropped / ‖W‖²_F, where ‖W‖²_F = ‖W_world‖²_F + Σσ²_dropped
        delta_loss         the loss with only this layer truncated, minus loss_original
        kept_sigma         the singular values of W_world, to 5 significant digits (for plots)
        criteria           (with calibration) both criteria side by side, each with the layer's t:
                           {"sigma"|"activation": {dropped_index, output_energy_share: the share of
                           E‖Wx‖² on the calibration inputs it drops, delta_loss}}
      loss_truncated_by  (with calibration) {criterion: the loss with every layer truncated that way}
      harmless_targets, harmful_targets   projection names (q_proj, ...) whose layers' Δloss sum to
                                          at most / more than warn_above
      warning         None, or what to do when truncation raises the loss by more than warn_above nats
    calibration: collect_input_statistics's {layer: E[xxᵀ]}, to measure both criteria (4 + 2 x layers
    loss calls at most; sets that coincide are measured once). The model ends up with its own
    Parameters again, bit for bit, in any dtype.
    """
    layers = _kasa_layers(model)
    trained = [name for name, layer in layers if layer.kasa_B.any()]
    if trained:
        raise KaSAError(f"{trained[0]} (and {len(trained) - 1} more layers) has a trained adapter (kasa_B != 0), "
                        "so the loss would mix training with truncation: call truncation_report right after "
                        "apply_kasa, before the first optimizer step")
    if calibration is not None:
        _raise_first_kind([p for p in (calibration_problem(name, layer.weight_out_in(), calibration)
                                       for name, layer in layers) if p is not None])
    criteria = {} if calibration is None else {name: _criteria_weights(layer, calibration[name])
                                               for name, layer in layers}
    variants = {"applied": {name: layer.weight for name, layer in layers},
                **{c: {name: criteria[name][c][0] for name, _ in layers} for c in TRUNCATION_CRITERIA if criteria}}
    loss_original, results = _measure_truncation_losses(model, layers, compute_loss, variants)
    loss_truncated, delta_loss = results["applied"]
    rows = []
    for name, layer in layers:
        dropped_sigma = layer.kasa_dropped_US.double().norm(dim=0)
        dropped_energy = dropped_sigma.square().sum().item()
        W_world = layer.weight.to(svd_dtype(layer.weight))
        kept_sigma = torch.linalg.svdvals(W_world)[:min(W_world.shape) - dropped_sigma.numel()]
        rows.append({"name": name, "truncation": dropped_sigma.numel(), "dropped_sigma": dropped_sigma.tolist(),
                     "dropped_index": layer.kasa_dropped_index.tolist(),
                     "energy_share": dropped_energy / (W_world.double().square().sum().item() + dropped_energy),
                     "delta_loss": delta_loss.get(name, 0.0),
                     "kept_sigma": [float(f"{s:.5g}") for s in kept_sigma.tolist()]})
        if criteria:
            rows[-1]["criteria"] = {c: {"dropped_index": index, "output_energy_share": share,
                                        "delta_loss": results[c][1].get(name, 0.0)}
                                    for c, (_, index, share) in criteria[name].items()}
    rows.sort(key=lambda row: -row["delta_loss"])
    by_kind = {}                                           # Δloss summed per projection (q_proj, v_proj, ...)
    for row in rows:
        kind = row["name"].rpartition(".")[2]
        by_kind[kind] = by_kind.get(kind, 0.0) + row["delta_loss"]
    harmless = sorted(kind for kind, delta in by_kind.items() if delta <= warn_above)
    increase = loss_truncated - loss_original
    return {"loss_original": loss_original, "loss_truncated": loss_truncated, "layers": rows,
            **({"loss_truncated_by": {c: results[c][0] for c in TRUNCATION_CRITERIA}} if criteria else {}),
            "harmless_targets": harmless, "harmful_targets": sorted(set(by_kind) - set(harmless)),
            "warning": _truncation_warning(rows, by_kind, harmless, increase) if increase > warn_above else None}


def _truncation_warning(rows: list, by_kind: dict, harmless: list, increase: float) -> str:
    """Name the worst layers and the ways out: adapt only the harmless projections, or do not truncate."""
    harmful = sorted(set(by_kind) - set(harmless))
    retarget = (f"adapt only {','.join(harmless)} (apply_kasa(..., targets={tuple(harmless)})), or adapt "
                f"{','.join(harmful)} without truncation (a separate apply_kasa(..., targets={tuple(harmful)}, "
                "truncation=0)), or " if 0 < len(harmless) < len(by_kind) else "")
    worst = [row for row in rows if row["delta_loss"] > 0][:3]
    return (f"truncation raises the loss by {increase:+.3f} nats before training (per projection: "
            + ", ".join(f"{kind} {delta:+.3f}" for kind, delta in sorted(by_kind.items()))
            + "; worst layers: " + (", ".join(f"{row['name']} {row['delta_loss']:+.3f}" for row in worst) or "none alone")
            + f"). Their smallest singular directions are not noise for this model. To keep them, {retarget}"
            "switch truncation off (apply_kasa(..., truncation=0)). KaSA still runs as configured.")


def format_truncation_report(report: dict, top: int = 10) -> str:
    """The report as a plain-text table, worst layers first, then the totals and any warning."""
    rows, both = report["layers"], "loss_truncated_by" in report
    width = max(len("layer"), *(len(row["name"]) for row in rows[:top]))
    lines = ["KaSA truncation report (Δloss: the loss change when only that layer is truncated"
             + ("; σ | act: the same t triplets dropped by the smallest σ (the paper) | by the least output "
                "energy on the calibration inputs, out-energy: the share of E‖Wx‖² dropped, shared: "
                "triplets both drop)" if both else ")"),
             f"{'layer':<{width}}  {'dropped σ (count)':<22}  {'energy':>9}  {'Δloss':>8}"
             + (f"  {'Δloss σ | act':>17}  {'out-energy σ | act':>19}  shared" if both else "")]
    for row in rows[:top]:
        sigma = row["dropped_sigma"]
        dropped = ("none (truncation 0)" if not sigma else f"{sigma[0]:.3g}" if len(sigma) == 1
                   else f"{sigma[0]:.3g} .. {sigma[-1]:.3g} ({len(sigma)})")
        line = f"{row['name']:<{width}}  {dropped:<22}  {100 * row['energy_share']:>8.2g}%  {row['delta_loss']:>+8.4f}"
        if both:
            by_sigma, by_activation = row["criteria"]["sigma"], row["criteria"]["activation"]
            shared = len(set(by_sigma["dropped_index"]) & set(by_activation["dropped_index"]))
            line += (f"  {by_sigma['delta_loss']:>+8.4f} {by_activation['delta_loss']:>+8.4f}  "
                     f"{100 * by_sigma['output_energy_share']:>8.2g}% {100 * by_activation['output_energy_share']:>8.2g}%"
                     f"  {shared}/{row['truncation']}")
        lines.append(line)
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} more layers")
    lines.append(f"loss {report['loss_original']:.4f} (original) -> {report['loss_truncated']:.4f} (truncated), "
                 f"{report['loss_truncated'] - report['loss_original']:+.4f}; the per-layer Δloss add up to "
                 f"{sum(row['delta_loss'] for row in rows):+.4f}")
    if both:
        lines.append("every layer truncated by " + ", by ".join(
            f"{c}: {loss:.4f} ({loss - report['loss_original']:+.4f})" for c, loss in report["loss_truncated_by"].items()))
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
    W = original["q_proj"].float()
    worlds = {m: truncate_minor_components(W, 4, m)[0] for m in TRUNCATION_METHODS}
    assert all(torch.allclose(w, worlds["svd"], atol=1e-5) for w in worlds.values())
    print(f"ok  the exact truncation paths {sorted(worlds)} agree on W_world (float32)")
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
