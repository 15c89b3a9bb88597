"""One command for a GPU that needs nothing downloaded: how fast KaSA trains, decodes and initialises.

GPT-2 Medium's shapes (24 layers, width 1024, 16 heads, vocabulary 50,257: the paper's E2E model)
with random weights, so no checkpoint is needed; speed does not depend on the values. For KaSA
(kasa.apply_kasa r=4 on q_proj, v_proj, α=32, β=1e-4, γ=1e-3: the paper's E2E setting) and for
LoRA (the same KaSALinear with truncation=0 and learn_sigma=False, exactly what train.py --method
lora builds, trained without the regularizers), one after the other in one run:

  1. adapter init: apply_kasa on the whole model (KaSA: 48 SVDs of 1024×1024);
  2. training: forward + backward of the next-token loss (model.loss, a target at every position of
     a random batch, 8 × 512 tokens), the regularizers (KaSA) and an AdamW step, under bf16 autocast
     with the frozen base stored in bf16 as train.py does on CUDA; tokens/s, and MFU against the
     GPU's dense bf16 peak (PEAK_BF16_TFLOPS by device name, or --peak-tflops). Model FLOPs follow
     PaLM's convention (Chowdhery et al. 2022, app. B; nanoGPT's estimate_mfu): 6·N per token for
     the matmuls (N: every parameter but the position embeddings) plus 12·n_layer·d_model·T for
     attention's QKᵀ and AV over the whole T×T (the causal half is not discounted). With a frozen
     base, backward skips the weight gradients (about 4·N of work instead of 6·N), so this MFU is on
     the scale full training is measured on, not the hardware's utilisation;
  3. peak memory of training (torch.cuda.max_memory_allocated; CUDA only);
  4. beam-10 decoding (eval.beam_search, the paper's E2E search: length penalty 0.9, no repeated
     4-grams) of 8 random 40-token prompts, 64 new tokens each, on the merged model: new tokens/s of
     the best hypotheses (× 10 beams are computed);
  5. KaSA init of a single nn.Linear at 1024² and 4096² (apply_kasa's SVD truncation), synchronised.

Writes a JSON (--out) and prints a table. Timings: training is the mean of --steps steps after
--warmup steps, decoding and single-layer init the median of --repeats runs after one untimed run.

    python bench/gpu.py                                # CUDA, bf16 autocast; writes gpu.json
    python bench/gpu.py --peak-tflops 989 --out /tmp/h100.json
    python bench/gpu.py --device cpu --tiny            # the same measurements at tiny sizes, seconds
"""
import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import errors  # noqa: E402
import eval as evaluation  # noqa: E402
import files  # noqa: E402
import kasa  # noqa: E402
import model as M  # noqa: E402

GPT2_MEDIUM = M.ModelConfig(family="gpt2", vocab_size=50257, n_layer=24, n_head=16, d_model=1024, max_position=1024,
                            activation="gelu_tanh", tie_embeddings=True, attn_bias=True, mlp_bias=True)
TINY = M.ModelConfig(family="gpt2", vocab_size=512, n_layer=2, n_head=4, d_model=64, max_position=128,
                     activation="gelu_tanh", tie_embeddings=True, attn_bias=True, mlp_bias=True)
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets, matched as a
# substring of torch.cuda.get_device_name() in this order (the more specific name first).
PEAK_BF16_TFLOPS = (("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0),
                    ("A10", 125.0))
# (method, apply_kasa switches, regularized): LoRA is KaSALinear with step 1 (truncation) and
# step 2's learned σ off, as train.py builds it, trained without KaSA's L2 and L3.
METHODS = (("kasa", dict(truncation=None, learn_sigma=True), True),
           ("lora", dict(truncation=0, learn_sigma=False), False))
BETA, GAMMA = 1e-4, 1e-3


@dataclasses.dataclass
class Sizes:
    config: M.ModelConfig
    batch_size: int
    seq_len: int
    prompts: int
    prompt_len: int
    new_tokens: int
    layer_dims: tuple


FULL = Sizes(GPT2_MEDIUM, batch_size=8, seq_len=512, prompts=8, prompt_len=40, new_tokens=64, layer_dims=(1024, 4096))
SMALL = Sizes(TINY, batch_size=2, seq_len=32, prompts=2, prompt_len=8, new_tokens=8, layer_dims=(64, 128))


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The device's dense bf16 peak: --peak-tflops, else the table, else None (no MFU)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def train_flops_per_token(model: M.Transformer, seq_len: int) -> float:
    """6·N + 12·n_layer·d_model·T (see the module docstring); N without the position embeddings."""
    n = model.num_params() - (model.pos_emb.weight.numel() if model.pos_emb is not None else 0)
    return 6 * n + 12 * model.config.n_layer * model.config.d_model * seq_len


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def train_speed(model, batch, regularized: bool, args, device, amp_dtype) -> dict:
    """Mean seconds per optimizer step after the warmup steps, and the peak memory of training."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    input_ids, targets = batch
    losses = []

    def step():
        with autocast(device, amp_dtype):
            loss = model.loss(input_ids, targets).float()
        if regularized:  # Eq. 11: task + β L2 + γ L3
            l2, l3 = kasa.kasa_regularization(model)
            loss = loss + BETA * l2 + GAMMA * l3
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    seconds = timed(lambda: [step() for _ in range(args.steps)], device) / args.steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return dict(step_s=seconds, tokens_per_s=input_ids.numel() / seconds, peak_memory_bytes=peak,
                trainable=sum(p.numel() for p in trainable), first_loss=losses[0].item(), last_loss=losses[-1].item())


def decode_speed(model, sizes: Sizes, args, device, amp_dtype) -> dict:
    """Median seconds of one beam-10 search over sizes.prompts random prompts, on the merged model."""
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.config.vocab_size, (sizes.prompts, sizes.prompt_len), generator=generator).tolist()
    config = evaluation.BeamSearchConfig(num_beams=args.num_beams, max_new_tokens=sizes.new_tokens)
    model.eval()

    def search():
        with torch.no_grad(), autocast(device, amp_dtype):
            return evaluation.beam_search(model, prompts, None, config)
    lengths = [len(tokens) for tokens in search()]  # untimed: no eos, so every hypothesis runs to the limit
    seconds = statistics.median(timed(search, device) for _ in range(args.repeats))
    return dict(decode_s=seconds, new_tokens=sum(lengths), decode_tokens_per_s=sum(lengths) / seconds)


def layer_init_seconds(dim: int, r: int, args, device, dtype) -> float:
    """Median seconds of apply_kasa (its SVD truncation) on one fresh dim × dim nn.Linear."""
    torch.manual_seed(0)
    weight = torch.randn(dim, dim, device=device, dtype=dtype) / dim ** 0.5

    def once() -> float:
        layer = nn.ModuleDict({"q_proj": nn.Linear(dim, dim, device=device, dtype=dtype)})
        with torch.no_grad():
            layer.q_proj.weight.copy_(weight)
        return timed(lambda: kasa.apply_kasa(layer, targets=("q_proj",), r=r, alpha=2 * r), device)
    once()  # untimed: the first call loads the solver (cuSOLVER / LAPACK)
    return statistics.median(once() for _ in range(args.repeats))


def bench_method(name, switches, regularized, base, batch, sizes, args, device, amp_dtype) -> dict:
    model = copy.deepcopy(base).to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    init_s = timed(lambda: kasa.apply_kasa(model, targets=("q_proj", "v_proj"), r=args.r, alpha=args.alpha,
                                           **switches), device)
    model.train()
    row = dict(method=name, init_s=init_s, **train_speed(model, batch, regularized, args, device, amp_dtype))
    kasa.merge_kasa(model)
    row.update(decode_speed(model, sizes, args, device, amp_dtype))
    del model
    return row


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (2 layers, width 64, batch 2 × 32): seconds, "
                                                             "to check that the command works")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                        help="autocast dtype; the frozen base is stored in it too (default: bfloat16 on CUDA, "
                             "float32 on the CPU)")
    parser.add_argument("--r", type=int, default=4, help="adapter rank (default: %(default)s, the paper's E2E)")
    parser.add_argument("--alpha", type=float, default=32.0, help="adapter α (default: %(default)s)")
    parser.add_argument("--num-beams", type=int, default=10, help="(default: %(default)s, the paper's E2E)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed decodes and layer inits (default: %(default)s)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak in TFLOP/s for MFU (default: from PEAK_BF16_TFLOPS by "
                             "device name; none on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="of the random weights and batch (default: %(default)s)")
    parser.add_argument("--out", default="gpu.json", help="the JSON results (default: %(default)s)")
    args = parser.parse_args(argv)
    for flag in ("r", "num_beams", "steps", "repeats"):
        if getattr(args, flag) < 1:
            raise errors.ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise errors.ConfigError(f"--warmup must be 0 or more, got {args.warmup}")
    return args


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise errors.ConfigError(f"--device {name}: {e}; use cuda, cuda:N or cpu") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise errors.ConfigError("--device cuda: no CUDA GPU is visible to torch; on a CPU run "
                                 "`--device cpu --tiny` (seconds) or `--device cpu` (GPT-2 Medium, slow)")
    if device.type not in ("cuda", "cpu"):
        raise errors.ConfigError(f"--device {name}: only cuda and cpu are supported")
    return device


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    sizes = SMALL if args.tiny else FULL
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    amp_dtype = torch.bfloat16 if dtype_name == "bfloat16" else None
    base_dtype = amp_dtype or torch.float32
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    cfg = sizes.config
    print(f"{name}; torch {torch.__version__}; GPT-2 Medium shapes{' (tiny)' if args.tiny else ''}: {cfg.n_layer} "
          f"layers, width {cfg.d_model}, random weights in {dtype_name}; r={args.r} on q_proj, v_proj; batch "
          f"{sizes.batch_size} × {sizes.seq_len}; peak {f'{peak:g} TFLOP/s' if peak else 'unknown (no MFU)'}",
          flush=True)

    torch.manual_seed(args.seed)
    base = M.Transformer(copy.deepcopy(cfg))
    with torch.no_grad():  # GPT-2's embedding init (N(0, 0.02²)): N(0, 1) tied logits would be ~d_model
        for embedding in (base.tok_emb, base.pos_emb):
            embedding.weight.normal_(std=0.02)
    base = base.to(base_dtype)
    flops_per_token = train_flops_per_token(base, sizes.seq_len)
    input_ids = torch.randint(0, cfg.vocab_size, (sizes.batch_size, sizes.seq_len), device=device)
    targets = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], 1)
    torch.linalg.svd(torch.randn(8, 8, device=device))  # load the solver (cuSOLVER / LAPACK) before timing KaSA's init
    rows = []
    for method, switches, regularized in METHODS:
        row = bench_method(method, switches, regularized, base, (input_ids, targets), sizes, args, device, amp_dtype)
        row["tflops"] = flops_per_token * row["tokens_per_s"] / 1e12
        row["mfu"] = row["tflops"] / peak if peak else None
        rows.append(row)
        print(f"  {method}: {row['tokens_per_s']:,.0f} training tokens/s, {row['decode_tokens_per_s']:,.1f} beam-"
              f"{args.num_beams} tokens/s", flush=True)
    layer_init = {f"{dim}x{dim}": layer_init_seconds(dim, args.r, args, device, base_dtype) for dim in sizes.layer_dims}

    results = dict(device=name, torch=torch.__version__, tiny=args.tiny, dtype=dtype_name, peak_tflops=peak,
                   flops_per_token=flops_per_token,
                   flops="6*N + 12*n_layer*d_model*T per token, N without position embeddings (PaLM app. B)",
                   batch_size=sizes.batch_size, seq_len=sizes.seq_len, r=args.r, num_beams=args.num_beams,
                   prompts=sizes.prompts, prompt_len=sizes.prompt_len, new_tokens=sizes.new_tokens,
                   methods=rows, layer_init_s=layer_init,
                   kasa_over_lora=dict(step_time=rows[0]["step_s"] / rows[1]["step_s"],
                                       decode_time=rows[0]["decode_s"] / rows[1]["decode_s"]))
    print_table(results)
    out = files.write_text_atomic(args.out, json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return results


def print_table(results: dict):
    def gib(n):
        return "—" if n is None else f"{n / 2**30:.2f}"
    print(f"\n| method | init s | training tokens/s | TFLOP/s | MFU | peak memory GiB | beam-{results['num_beams']} "
          "new tokens/s | loss first → last |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results["methods"]:
        mfu = "—" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(f"| {row['method']} | {row['init_s']:.3f} | {row['tokens_per_s']:,.0f} | {row['tflops']:.2f} | {mfu} "
              f"| {gib(row['peak_memory_bytes'])} | {row['decode_tokens_per_s']:,.1f} "
              f"| {row['first_loss']:.3f} → {row['last_loss']:.3f} |")
    ratios = results["kasa_over_lora"]
    print(f"\nKaSA / LoRA time: training step {ratios['step_time']:.3f}, beam decoding {ratios['decode_time']:.3f}")
    print("KaSA init of one nn.Linear (median): " + ", ".join(f"{shape} {s:.4f} s"
                                                             for shape, s in results["layer_init_s"].items()))


if __name__ == "__main__":
    errors.run_cli(main)
