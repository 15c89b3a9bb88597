"""What does KaSA cost per training step, compared with LoRA and with no adapter?

Measured side by side in one run, interleaved round-robin so that machine noise hits every
variant alike; the table reports median times and ratios.

  1. forward+backward of one layer: KaSALinear vs a LoRA layer vs the frozen nn.Linear alone
  2. the orthogonality regularizer: the paper's r x r Gram matrices (kasa.kasa_regularization)
     vs the official code's in x in / out x out ones, forward+backward over a model's layers
  3. the truncation at init (step 1): our exact paths ('gram': float64 eigendecomposition of the
     smaller Gram matrix; 'subspace': inverse subspace iteration for the r smallest triplets only)
     against PEFT's KaSA init (a float32 full SVD per layer) on SmolLM2-135M's 60 q_proj/v_proj
     weights (real weights from the GGUF given by --gguf or KASA_SMOLLM2_GGUF; else random ones
     with a decaying spectrum), and against a full SVD at 4096 x 4096 (LLaMA-7B's q_proj)

Shapes for 1-2: GPT-2 Medium's attention projection (1024 x 1024, 24 layers) and LLaMA-7B's
(4096 x 4096, 32 layers), two targets (q, v) per layer.

    python bench/bench_kasa.py              # everything (the 4096 SVDs take ~12 s each on 2 CPU cores)
    python bench/bench_kasa.py --quick      # GPT-2 Medium shape only, fewer repeats
    python bench/bench_kasa.py --init-only  # only 3
"""
import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import errors  # noqa: E402
import kasa  # noqa: E402


class LoRALinear(nn.Module):
    """Plain LoRA (Hu et al., 2021) for comparison: y = W x + b + (α/r) B A x."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        self.scaling = alpha / r

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


def official_orthogonality(layers):
    """The official code's L3: ‖AᵀA − I_in‖_F + ‖BBᵀ − I_out‖_F per layer (d x d Gram matrices)."""
    total = 0.0
    for layer in layers:
        A, B = layer.kasa_A, layer.kasa_B
        total = total + torch.linalg.norm(A.T @ A - torch.eye(A.shape[1])) \
                      + torch.linalg.norm(B @ B.T - torch.eye(B.shape[0]))
    return total


class Adapted(nn.Module):
    """n_layers KaSA layers, for the regularizer benchmark."""

    def __init__(self, d, n_layers, r):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(n_layers))
        kasa.apply_kasa(self, targets=tuple(str(i) for i in range(n_layers)), r=r)
        for layer in self.layers:
            layer.kasa_B.data.normal_(0, 0.02)


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step(layer, x):
    def step():
        layer(x).float().square().mean().backward()
        for p in layer.parameters():
            p.grad = None
    return step


def bench_layer(d, tokens, r, repeats):
    torch.manual_seed(0)
    base = nn.Linear(d, d)
    base.requires_grad_(False)
    kasa_layer = kasa.KaSALinear(base, r=r, alpha=2 * r)
    kasa_layer.kasa_B.data.normal_(0, 0.02)
    lora_layer = LoRALinear(base, r=r, alpha=2 * r)
    # x needs a gradient, as inside a network: the frozen base still backpropagates to its input.
    x = torch.randn(tokens, d, requires_grad=True)
    return interleaved_medians({"frozen": train_step(base, x), "lora": train_step(lora_layer, x),
                                "kasa": train_step(kasa_layer, x)}, repeats)


def bench_regularizer(d, n_layers, r, repeats):
    model = Adapted(d, 2 * n_layers, r)
    layers = list(model.layers)

    def paper():
        sum(kasa.kasa_regularization(model)).backward()

    def official():
        official_orthogonality(layers).backward()
    return interleaved_medians({"paper r x r": paper, "official d x d": official}, repeats, warmup=1)


def smollm2_projections(gguf):
    """SmolLM2-135M's 30 q_proj (576x576) and 30 v_proj (192x576) weights: real ones from the GGUF, or
    random ones with a decaying spectrum of the same shapes; returns (weights by name, description)."""
    if gguf:
        import model as model_py
        if not Path(gguf).is_file():
            raise errors.ConfigError(f"--gguf {gguf}: no such file; pass the SmolLM2-135M .gguf file, or "
                                     "leave --gguf and KASA_SMOLLM2_GGUF unset to use random weights")
        pretrained = model_py.load_pretrained(gguf)[0]
        weights = {name: m.weight.detach().clone() for name, m in pretrained.named_modules()
                   if name.endswith(("q_proj", "v_proj"))}
        return weights, "real SmolLM2-135M weights (GGUF Q4_1, dequantized to float32)"
    weights = {}
    for i in range(30):
        for name, shape in (("q_proj", (576, 576)), ("v_proj", (192, 576))):
            weights[f"blocks.{i}.attn.{name}"] = decaying_spectrum(*shape, seed=i)
    return weights, "random weights with a decaying spectrum, SmolLM2-135M's shapes"


def decaying_spectrum(out_features, in_features, seed=0):
    """U diag(σ) Vᵀ with σ_i = (1 - i/k)² + 0.02: a slow decay into a crowded tail, as in pretrained weights."""
    generator = torch.Generator().manual_seed(seed)
    k = min(out_features, in_features)
    U = torch.linalg.qr(torch.randn(out_features, k, generator=generator)).Q
    V = torch.linalg.qr(torch.randn(in_features, k, generator=generator)).Q
    return ((U * (torch.linspace(1, 0, k) ** 2 + 0.02)) @ V.T).contiguous()


class _PeftLayer:
    """The one thing PEFT's KaSA truncation asks of its module: get_base_layer()."""

    def __init__(self, base):
        self.base = base

    def get_base_layer(self):
        return self.base


def bench_init_smollm2(gguf, r, repeats):
    """Step 1 on each of SmolLM2's q/v weights: PEFT's KaSA truncation (its own function: a float32
    full SVD) vs a KaSALinear built with each of our methods. Interleaved per layer, in a rotating
    order, so that machine noise hits every variant alike; returns the sums over the layers."""
    from peft.tuners.lora.variants import KasaLinearVariant
    weights, description = smollm2_projections(gguf)
    totals = {"PEFT KaSA": 0.0, **{f"ours {m}": 0.0 for m in ("auto", "gram", "subspace")}}
    errors = {m: 0.0 for m in ("svd", "auto", "gram", "subspace")}

    default = kasa.default_truncation_method

    def ours(base, method):
        if method != "auto":                                   # force this method for every layer
            kasa.default_truncation_method = lambda *args: method
        try:
            kasa.KaSALinear(base, r=r, alpha=2 * r)
        finally:
            kasa.default_truncation_method = default

    for i, W in enumerate(weights.values()):
        base = nn.Linear(W.shape[1], W.shape[0], bias=False)
        base.weight.data.copy_(W)
        fns = {"PEFT KaSA": lambda: KasaLinearVariant._truncate_base_weight(_PeftLayer(copy.deepcopy(base)), r),
               **{f"ours {m}": (lambda m=m: ours(base, m)) for m in ("auto", "gram", "subspace")}}
        names = list(fns)
        for repeat in range(repeats):
            for name in names[(i + repeat) % len(names):] + names[:(i + repeat) % len(names)]:
                start = time.perf_counter()
                fns[name]()
                totals[name] += (time.perf_counter() - start) / repeats
        reference = kasa.truncate_minor_components(W.double(), r, "svd")[0]   # a float64 SVD's W_world
        for method in errors:
            W_world = kasa.truncate_minor_components(W, r, None if method == "auto" else method)[0]
            errors[method] = max(errors[method], ((W_world.double() - reference).norm() / W.double().norm()).item())
    return totals, errors, description, len(weights)


def bench_init_large(d, r, repeats):
    """One d x d layer: the full float32 SVD (PEFT's and the paper's truncation) vs subspace iteration,
    on a Gaussian and a decaying-spectrum weight; the error is against the SVD's W_world."""
    rows = []
    for label, W in (("Gaussian", torch.randn(d, d) / d ** 0.5), ("decaying spectrum", decaying_spectrum(d, d))):
        results = {}
        fns = {m: (lambda m=m: results.__setitem__(m, kasa.truncate_minor_components(W, r, m)[0]))
               for m in ("svd", "subspace")}
        times = interleaved_medians(fns, repeats, warmup=0)
        error = ((results["subspace"].double() - results["svd"].double()).norm() / W.double().norm()).item()
        rows.append((label, times, error))
    return rows


def print_init(args):
    gguf = args.gguf or os.environ.get("KASA_SMOLLM2_GGUF")
    times, errors, description, n = bench_init_smollm2(gguf, args.r, args.init_repeats)
    print(f"\nKaSA init (step 1) on {n} layers: {description}; r={args.r}; mean of {args.init_repeats} "
          "repeats interleaved per layer, summed over the layers")
    print("| init | whole model s | ratio to PEFT | max ‖W_world − float64 SVD's‖_F / ‖W‖_F |")
    print("|---|---|---|---|")
    for name, t in times.items():
        method = name.split()[-1]
        error = errors["svd" if name == "PEFT KaSA" else method]
        print(f"| {name} | {t:.3f} | {t / times['PEFT KaSA']:.2f} | {error:.1e} |")
    if args.quick:
        return
    d = 4096
    print(f"\nKaSA init of one {d}x{d} layer (LLaMA-7B q_proj), r={args.r}, median of {args.large_repeats} "
          "interleaved repeats; error against the float32 SVD's W_world")
    print("| weight | full SVD s | subspace s | subspace / SVD | ‖W_world − SVD's‖_F / ‖W‖_F |")
    print("|---|---|---|---|---|")
    for label, t, error in bench_init_large(d, args.r, args.large_repeats):
        print(f"| {label} | {t['svd']:.2f} | {t['subspace']:.2f} | {t['subspace'] / t['svd']:.2f} | {error:.1e} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="GPT-2 Medium shape only, fewer repeats")
    parser.add_argument("--r", type=int, default=8, help="adapter rank (default 8)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (batch x sequence)")
    parser.add_argument("--repeats", type=int, default=20, help="repeats of the per-step timings")
    parser.add_argument("--init-only", action="store_true", help="only the init benchmark (3)")
    parser.add_argument("--init-repeats", type=int, default=3, help="repeats of the SmolLM2 init timing")
    parser.add_argument("--large-repeats", type=int, default=2, help="repeats of the 4096x4096 init timing")
    parser.add_argument("--gguf", default=None, help="SmolLM2-135M .gguf file (default: $KASA_SMOLLM2_GGUF; "
                        "without either, random weights of its shapes)")
    args = parser.parse_args(argv)
    if args.init_only:
        print_init(args)
        return
    shapes = [("GPT-2 Medium", 1024, 24)] + ([] if args.quick else [("LLaMA-7B", 4096, 32)])
    repeats = 5 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, r={args.r}, {args.tokens} tokens/step\n")

    print("| shape | frozen Linear ms | LoRA ms | KaSA ms | KaSA / LoRA | KaSA / frozen |")
    print("|---|---|---|---|---|---|")
    for label, d, _ in shapes:
        t = bench_layer(d, args.tokens, args.r, repeats)
        print(f"| {label} {d}x{d} | {t['frozen'] * 1e3:.2f} | {t['lora'] * 1e3:.2f} | {t['kasa'] * 1e3:.2f} "
              f"| {t['kasa'] / t['lora']:.3f} | {t['kasa'] / t['frozen']:.3f} |")

    print("\n| shape | layers | paper r x r L3 ms | official d x d L3 ms | official / paper |")
    print("|---|---|---|---|---|")
    for label, d, n_layers in shapes:
        t = bench_regularizer(d, n_layers, args.r, max(3, repeats // 4))
        print(f"| {label} | {2 * n_layers} | {t['paper r x r'] * 1e3:.2f} | {t['official d x d'] * 1e3:.1f} "
              f"| {t['official d x d'] / t['paper r x r']:.0f}x |")

    print_init(args)


if __name__ == "__main__":
    errors.run_cli(main)
