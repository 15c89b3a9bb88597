"""What does KaSA cost per training step, compared with LoRA and with no adapter?

Measured side by side in one run, interleaved round-robin so that machine noise hits every
variant alike; the table reports median times and ratios.

  1. forward+backward of one layer: KaSALinear vs a LoRA layer vs the frozen nn.Linear alone
  2. the orthogonality regularizer: the paper's r x r Gram matrices (kasa.kasa_regularization)
     vs the official code's in x in / out x out ones, forward+backward over a model's layers
  3. the SVD truncation at init, per layer

Shapes: GPT-2 Medium's attention projection (1024 x 1024, 24 layers) and LLaMA-7B's
(4096 x 4096, 32 layers), two targets (q, v) per layer.

    python bench/bench_kasa.py              # both shapes (the 4096 SVD alone takes a while on a CPU)
    python bench/bench_kasa.py --quick      # GPT-2 Medium shape only, fewer repeats
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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


def bench_svd(d, r, repeats):
    base = nn.Linear(d, d)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        kasa.KaSALinear(base, r=r)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="GPT-2 Medium shape only, fewer repeats")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (batch x sequence)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
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

    print("\n| shape | SVD init per layer s | whole model (2 targets x layers) s |")
    print("|---|---|---|")
    for label, d, n_layers in shapes:
        t = bench_svd(d, args.r, 3 if d <= 1024 else 1)
        print(f"| {label} {d}x{d} | {t:.3f} | {t * 2 * n_layers:.1f} |")


if __name__ == "__main__":
    main()
