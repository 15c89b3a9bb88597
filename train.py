"""Fine-tune a language model with KaSA, then decode and score: `python train.py --task e2e`,
or classify: `python train.py --task sst2` (GLUE: cola, sst2, mrpc, qnli, rte, stsb).

A plain PyTorch loop, top to bottom:
  1. config: the task's preset (the paper's setting), then any flag the user gave
  2. model: load a pretrained checkpoint, then adapt the target projections (kasa.py), or a
     baseline (--method lora|pissa|milora|full) on the same loop, data and budget
  3. data: tokenized examples, a seeded order per epoch (so --resume knows exactly where it was)
  4. train: AdamW, warmup + linear decay, loss = task + β·L2 + γ·L3 (Eq. 11), gradient
     accumulation, atomic checkpoints
  5. evaluate: merge ΔW into W_world (zero added latency), decode the test set, score it (eval.py);
     GLUE scores its dev set after every epoch too, and reports the final and the best epoch

Runs on CUDA when available (bf16 autocast, or fp16 with a GradScaler on GPUs without bf16),
on the CPU otherwise; `torchrun --nproc_per_node=N train.py ...` trains on N processes (DDP).
Every KaSA init first reports what the SVD truncation costs (truncation_report.json), and
training ends with plots (plots/*.png) and, with --export, PEFT and Hugging Face copies.
A run directory (--out-dir, default runs/<task>) ends up holding:
  config.json, checkpoint.pt (adapter + optimizer + RNG + data position), adapter.safetensors,
  history.json (losses), metrics.json, and the task's outputs (E2E: predictions.txt, references.txt;
  GLUE: head.safetensors, the classification head, and dev_predictions.tsv).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import data
import eval as evaluation
import kasa
from model import ClassificationHead, load_pretrained, save_hf_checkpoint, save_peft_adapter

# -----------------------------------------------------------------------------
# 1. Config


@dataclass
class TrainConfig:
    task: str = "e2e"
    model: str = "gpt2-medium"            # hub id, local HF dir, or .gguf file
    data_dir: str = None                  # local data files instead of the download cache
    data_version: str = "original"        # e2e: original | cleaned
    out_dir: str = None                   # default: runs/<task>
    # the adapter (kasa.py)
    method: str = "kasa"                  # kasa | lora | pissa | milora | full
    targets: tuple = ("q_proj", "v_proj")  # names, or a preset: qv | qkvo | all (every linear layer in the blocks)
    r: int = 4
    alpha: float = 32.0
    adapter_dropout: float = 0.1
    truncation: int = None                # triplets dropped per layer; None: r (the paper), 0: no truncation
    untruncated_targets: tuple = ()       # targets KaSA adapts without truncating (those the report shows it hurts)
    learn_sigma: bool = True              # False: Δσ fixed at 1 (ablation)
    truncation_criterion: str = "sigma"   # sigma: drop the smallest σ (the paper) | activation: the least output energy on calibration inputs
    calibration_batches: int = 4          # training batches (the seed's first) whose inputs E[xxᵀ] the activation criterion and the report use
    truncation_report: bool = True        # measure what the SVD truncation costs before training (kasa.py)
    beta: float = 1e-4                    # weight of L2 = Σ‖Δσ‖²                      (Eq. 11)
    gamma: float = 1e-3                   # weight of L3 = Σ‖BᵀB − I‖² + ‖AAᵀ − I‖²      (Eq. 11)
    #                                       (the command line sets both to 0 for the other methods
    #                                        unless --beta / --gamma are given: see parse_config)
    # optimization
    lr: float = 2e-4
    weight_decay: float = 0.01
    batch_size: int = 8                   # per process: torchrun with N processes trains on N × batch_size
    grad_accum: int = 1
    epochs: int = 5
    warmup_steps: int = 500
    warmup_ratio: float = 0.0             # > 0: warm up over this fraction of all steps instead (GLUE: 0.06)
    label_smoothing: float = 0.1
    grad_clip: float = 0.0                # 0: no clipping
    max_steps: int = None                 # stop early (short runs)
    max_train_examples: int = None
    max_len: int = 512
    seed: int = 110
    # bookkeeping
    log_every: int = 10
    save_every: int = 1000
    resume: bool = False
    dtype: str = "auto"                   # auto: bf16 (or fp16) autocast on CUDA, float32 on the CPU
    export: bool = False                  # also write RUN_DIR/export/hf (merged) and export/peft (LoRA of rank r+t)
    # evaluation (the LoRA paper's E2E decoding)
    eval: bool = True
    num_beams: int = 10
    length_penalty: float = 0.9
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64
    eval_batch_size: int = 8
    max_eval_examples: int = None         # decode only the first N unique test MRs (GLUE: score the first N dev rows)


# The paper's E2E setting: GPT-2 Medium with the LoRA E2E recipe (r=4, α=32, adapter dropout 0.1,
# lr 2e-4, batch 8, 5 epochs, 500 warmup steps, label smoothing 0.1, weight decay 0.01) and KaSA's
# β=1e-4, γ=1e-3. These are the TrainConfig defaults; GLUE presets override them.
PRESETS = {
    "e2e": {},
}


def glue_preset(lr: float, batch_size: int, epochs: int, beta: float, gamma: float) -> dict:
    """The official KaSA GLUE scripts (juyongjiang/KaSA, runs/roberta_base_<task>.sh, RoBERTa-base):
    r=8, α=16 on the query and value projections, no dropout, no weight decay, one lr for the adapter
    and the head, 6% linear warmup then linear decay, max length 512, seed 0; per task the lr, batch,
    epochs, β and γ. Their backbone is an encoder; ours are decoders, so the default model is GPT-2
    small (124M parameters, RoBERTa-base has 125M) with the head on the last token. Their β and γ were
    tuned for the official code's regularizer (d×d Gram matrices, unsquared norms, the sum divided by
    the number of layers), not for the paper's form used here: see the README's GLUE section."""
    return dict(model="gpt2", r=8, alpha=16.0, adapter_dropout=0.0, weight_decay=0.0, warmup_ratio=0.06,
                label_smoothing=0.0, max_len=512, seed=0, eval_batch_size=32,
                lr=lr, batch_size=batch_size, epochs=epochs, beta=beta, gamma=gamma)


PRESETS.update({
    "sst2": glue_preset(lr=5e-4, batch_size=128, epochs=100, beta=1e-4, gamma=1e-3),
    "mrpc": glue_preset(lr=4e-4, batch_size=32, epochs=100, beta=1e-1, gamma=1e-3),
    "cola": glue_preset(lr=4e-4, batch_size=32, epochs=100, beta=1e-4, gamma=1e-3),
    "qnli": glue_preset(lr=4e-4, batch_size=32, epochs=10, beta=1e-2, gamma=1e-5),
    "rte": glue_preset(lr=4e-4, batch_size=32, epochs=100, beta=0.24, gamma=2.4e-4),
    "stsb": glue_preset(lr=3e-4, batch_size=32, epochs=40, beta=1e-4, gamma=1e-5),
})

METHODS = ("kasa", "lora", "pissa", "milora", "full")


def parse_config(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.type is tuple:
            parser.add_argument(flag, type=lambda s: tuple(t for t in s.split(",") if t), default=None,
                                help="comma-separated")
        else:
            parser.add_argument(flag, type=int if f.type is int else float if f.type is float else str,
                                default=None)
    args = parser.parse_args(argv)
    task = args.task or TrainConfig.task
    if task not in PRESETS:
        parser.error(f"unknown task {task!r}; choose one of {sorted(PRESETS)}")
    if args.method is not None and args.method not in METHODS:
        parser.error(f"unknown method {args.method!r}; choose one of {list(METHODS)}")
    if args.truncation_criterion not in (None, *kasa.TRUNCATION_CRITERIA):
        parser.error(f"unknown --truncation-criterion {args.truncation_criterion!r}; choose one of "
                     f"{list(kasa.TRUNCATION_CRITERIA)}")
    if args.calibration_batches is not None and args.calibration_batches < (args.truncation_criterion == "activation"):
        parser.error(f"--calibration-batches {args.calibration_batches}: must be >= 0, and >= 1 with "
                     "--truncation-criterion activation")
    given = {k: v for k, v in vars(args).items() if v is not None}
    values = {**PRESETS[task], **given}
    if values.get("method", TrainConfig.method) != "kasa":
        # L2 and L3 are KaSA's regularizers (Eq. 11): LoRA, PiSSA and MiLoRA train without them, as
        # in their papers, unless --beta / --gamma ask for them (e.g. to ablate L3 on LoRA).
        values.update(beta=given.get("beta", 0.0), gamma=given.get("gamma", 0.0))
    config = TrainConfig(**values)
    config.out_dir = config.out_dir or f"runs/{config.task}"
    return config


# -----------------------------------------------------------------------------
# 2. Model: which layers to adapt, and how each method adapts them

TARGET_PRESETS = {
    "qv": ("q_proj", "v_proj"),
    "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
}


def resolve_targets(targets: tuple, model: nn.Module) -> tuple:
    """Target names for apply_kasa; 'all' is every nn.Linear inside the transformer blocks."""
    if len(targets) == 1 and targets[0] == "all":
        return tuple(sorted({name.rpartition(".")[2] for name, m in model.named_modules()
                             if isinstance(m, nn.Linear) and name.startswith("blocks.")}))
    if len(targets) == 1 and targets[0] in TARGET_PRESETS:
        return TARGET_PRESETS[targets[0]]
    return targets


@torch.no_grad()
def init_from_principal_or_minor_components(model: nn.Module, which: str):
    """PiSSA ('largest') and MiLoRA ('smallest'): start the adapter at the top or bottom r singular
    triplets of W, and freeze the residual W − U_r Σ_r V_rᵀ as the base.

    Both reuse KaSALinear as a plain LoRA layer (no truncation, σ fixed at 1): scaling · B · A must
    equal U_r Σ_r V_rᵀ, so B = U_r √(Σ_r / s) and A = √(Σ_r / s) V_rᵀ. The removed part is stored
    as the layer's dropped triplets, so restore_base() and adapter loading work unchanged.
    """
    for _, layer in kasa._kasa_layers(model):
        W = layer.weight.to(kasa.svd_dtype(layer.weight))
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        part = slice(0, layer.r) if which == "largest" else slice(S.shape[0] - layer.r, S.shape[0])
        root = (S[part] / layer.scaling).sqrt()
        layer.kasa_B.copy_(U[:, part] * root)
        layer.kasa_A.copy_(root[:, None] * Vh[part])
        layer.kasa_dropped_US = (U[:, part] * S[part]).contiguous()
        layer.kasa_dropped_Vt = Vh[part].contiguous()
        layer.kasa_dropped_index = torch.arange(S.shape[0], device=S.device)[part]
        layer.weight.copy_(W - layer.kasa_dropped_US @ layer.kasa_dropped_Vt)


def adapt_model(model: nn.Module, config: TrainConfig, calibration: dict = None) -> list:
    """Apply the method to the model; returns the adapted layer names (empty for full fine-tuning).
    calibration: E[xxᵀ] per target layer, for --truncation-criterion activation."""
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad = True
        return []
    targets = resolve_targets(config.targets, model)
    by_activation = config.truncation_criterion == "activation"
    switches = {"kasa": dict(truncation=config.truncation, learn_sigma=config.learn_sigma,
                             truncation_criterion=config.truncation_criterion,
                             calibration=calibration if by_activation else None)}.get(
        config.method, dict(truncation=0, learn_sigma=False))  # LoRA, PiSSA, MiLoRA: no truncation, no σ
    untruncated = tuple(t for t in config.untruncated_targets if t in targets)
    if config.untruncated_targets and (len(untruncated) != len(config.untruncated_targets) or config.method != "kasa"):
        sys.exit(f"--untruncated-targets {','.join(config.untruncated_targets)}: each must be one of the "
                 f"--targets ({','.join(targets)}), and only --method kasa truncates")
    names = []
    if untruncated:  # the same KaSA layer with step 1 off, on the targets whose smallest triplets matter
        names += kasa.apply_kasa(model, targets=untruncated, r=config.r, alpha=config.alpha,
                                 dropout=config.adapter_dropout, truncation=0, learn_sigma=config.learn_sigma)
    truncated = tuple(t for t in targets if t not in untruncated)
    if truncated:
        names += kasa.apply_kasa(model, targets=truncated, r=config.r, alpha=config.alpha,
                                 dropout=config.adapter_dropout, **switches)
    if config.method in ("pissa", "milora"):
        init_from_principal_or_minor_components(model, "largest" if config.method == "pissa" else "smallest")
    return names


def text_loss(model, batch) -> torch.Tensor:
    """Mean next-token loss over every real token of a right-padded batch, no label smoothing:
    how well the model knows the text itself, whatever the task's own loss is."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return model.loss(input_ids[:, :-1], targets, attention_mask=mask[:, :-1])


def calibration_statistics(model, task, config: TrainConfig, device, amp_dtype) -> dict:
    """E[xxᵀ] of every target layer's inputs (kasa.collect_input_statistics) on the first
    --calibration-batches batches of the seed's order (epoch 0's), each example alone (no padding)."""
    examples = task.train_examples[:config.max_train_examples or None]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed))
    chosen = [examples[i] for i in order[:config.calibration_batches * config.batch_size].tolist()]

    def run_batches():
        for example in chosen:
            batch = task.collate([example])
            with torch.autocast(device.split(":")[0], dtype=amp_dtype, enabled=amp_dtype is not None):
                model.hidden_states(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    return kasa.collect_input_statistics(model, resolve_targets(config.targets, model), run_batches)


def report_truncation(model, probe_batches: list, device, amp_dtype, out_dir: Path, calibration: dict = None) -> dict:
    """Step 1's cost on this model, measured before training (kasa.truncation_report), printed worst
    layers first and saved as RUN_DIR/truncation_report.json. It only reports: a warning names the
    layers and the flags that avoid them (--targets, --truncation 0), and the run goes on as configured."""
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in probe_batches]

    def compute_loss():
        with torch.autocast(device.split(":")[0], dtype=amp_dtype, enabled=amp_dtype is not None):
            return sum(text_loss(model, batch).float() for batch in batches) / len(batches)
    report = kasa.truncation_report(model, compute_loss, calibration=calibration)
    print(kasa.format_truncation_report(report), flush=True)
    write_text_atomic(out_dir / "truncation_report.json", json.dumps(report, indent=1))
    return report


# -----------------------------------------------------------------------------
# 3. Tasks: what a batch is, its loss, and how the trained model is scored


@dataclass
class Task:
    train_examples: list                  # whatever `collate` takes, one item per training example
    collate: Callable                     # list of examples -> dict of tensors
    loss: Callable                        # (model, batch) -> mean task loss over the batch's loss units
    loss_units: Callable                  # batch -> how many units that mean is over (E2E: target tokens)
    evaluate: Callable                    # (model, out_dir) -> metrics dict
    probe_batches: list                   # a few fixed batches for the truncation report
    head: nn.Module = None                # a task head (GLUE): trains with the adapter, saved beside it
    select_by: str = None                 # set: score after every epoch, report the final and the best by this metric


def e2e_task(config: TrainConfig, model, tokenizer) -> Task:
    """E2E NLG: LoRA-style (MR, reference) sequences, loss on the reference tokens only."""
    if tokenizer is None:
        sys.exit(f"{config.model} ships no tokenizer; E2E needs one (tokenizer.json, vocab.json + merges.txt, "
                 "or a GGUF with a gpt2-style vocabulary)")
    eos_id, pad_id = data.eos_and_pad_ids(model.config)
    paths = data.resolve_e2e_files(config.data_version, config.data_dir)
    train_path = paths["train"]
    if train_path is None:
        train_path = paths["dev"]
        print(f"note: no E2E training split in {config.data_dir}; training on the dev set "
              f"({train_path.name}) and evaluating on the test set")
    train = [data.encode_e2e_example(tokenizer, ex.mr, ex.ref, eos_id, config.max_len)
             for ex in data.load_e2e_split(train_path)]
    collate = lambda examples: data.collate_e2e(examples, pad_id=pad_id)  # noqa: E731

    def loss(model, batch):
        return model.loss(batch["input_ids"], batch["targets"], attention_mask=batch["attention_mask"],
                          label_smoothing=config.label_smoothing)  # lm_head at target positions only

    # The one E2E evaluation (eval.py), the same as `eval.py --checkpoint`; it reads the test set now.
    evaluate = evaluation.e2e_evaluator(config, tokenizer)

    return Task(train, collate, loss, lambda batch: int((batch["targets"] != -100).sum()), evaluate,
                probe_batches=[collate(train[i:i + 8]) for i in (0, 8)])


# The metric that picks the best epoch, as in the official KaSA GLUE script.
GLUE_SELECT_BY = {"cola": "matthews", "sst2": "accuracy", "mrpc": "accuracy", "qnli": "accuracy",
                  "rte": "accuracy", "stsb": "pearson"}


def glue_task(config: TrainConfig, model, tokenizer) -> Task:
    """GLUE: a sentence (or pair) -> class scores with cross-entropy, or for STS-B one similarity
    score with MSE, from a linear head on the last real token; scored on the dev set."""
    if tokenizer is None:
        sys.exit(f"{config.model} ships no tokenizer; GLUE needs one (tokenizer.json, vocab.json + merges.txt, "
                 "or a GGUF with a gpt2-style vocabulary)")
    spec = data.glue_spec(config.task)
    # The head reads the last position where the attention mask is 1, so padding (eos for GPT-2)
    # never matters. eos also separates a pair's sentences.
    eos_id, pad_id = data.eos_and_pad_ids(model.config)
    paths = data.resolve_glue_files(config.task, config.data_dir)

    def encode(split, limit):  # tokenize only the rows that will be used (SST-2 has 67k)
        examples = data.load_glue_split(config.task, paths[split])[:limit or None]
        return list(zip(data.encode_glue_examples(tokenizer, examples, eos_id, config.max_len),
                        [ex.label for ex in examples]))
    train, dev = encode("train", config.max_train_examples), encode("dev", config.max_eval_examples)
    regression = spec.label_names is None
    device = model.tok_emb.weight.device
    head = ClassificationHead(model.config.d_model, 1 if regression else len(spec.label_names)).to(device)
    collate = lambda examples: data.collate_glue(examples, pad_id=pad_id)  # noqa: E731

    def scores(model, batch):
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
        return head(hidden, batch["attention_mask"]).float()

    def loss(model, batch):
        if regression:
            return F.mse_loss(scores(model, batch).squeeze(-1), batch["labels"])
        return F.cross_entropy(scores(model, batch), batch["labels"], label_smoothing=config.label_smoothing)

    @torch.no_grad()
    def evaluate(model, out_dir):
        predictions = []
        for start in range(0, len(dev), config.eval_batch_size):
            batch = {k: v.to(device) for k, v in collate(dev[start:start + config.eval_batch_size]).items()}
            batch_scores = scores(model, batch)
            predictions += (batch_scores.squeeze(-1) if regression else batch_scores.argmax(-1)).tolist()
        labels = [label for _, label in dev]
        write_text_atomic(out_dir / "dev_predictions.tsv", "prediction\tlabel\n" + "".join(
            f"{prediction}\t{label}\n" for prediction, label in zip(predictions, labels)))
        return evaluation.glue_metrics(config.task, predictions, labels)

    return Task(train, collate, loss, lambda batch: len(batch["labels"]), evaluate,
                probe_batches=[collate(train[i:i + 8]) for i in (0, 8)],
                head=head, select_by=GLUE_SELECT_BY[config.task])


TASKS = {"e2e": e2e_task, **{task: glue_task for task in data.GLUE_TASKS}}


# -----------------------------------------------------------------------------
# Small helpers: atomic files (a crash never leaves half a file), time formatting


def save_atomic(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_safetensors(tensors: dict, path: Path):
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# -----------------------------------------------------------------------------


class TaskLoss(nn.Module):
    """The model, the task's head and its loss as one module: what DistributedDataParallel wraps, so
    that every trainable parameter (adapter and head) is reached through forward()."""

    def __init__(self, model: nn.Module, head: nn.Module | None, loss: Callable):
        super().__init__()
        self.model, self.head, self.loss = model, head, loss

    def forward(self, batch):
        return self.loss(self.model, batch)


def init_distributed():
    """(rank, world size, device) under torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK), or one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return 0, 1, device
    if device != "cpu":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device != "cpu" else "gloo")
    return dist.get_rank(), world, device


def main(argv=None):
    config = parse_config(argv)
    out_dir = Path(config.out_dir)
    rank, world, device = init_distributed()
    is_main = rank == 0                     # rank 0 alone prints, writes checkpoints and evaluates
    log = print if is_main else (lambda *args, **kwargs: None)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)         # the same seed on every rank: the same adapter init

    # Device and precision: on CUDA the frozen base is stored in the autocast dtype (half the
    # memory) while the adapter stays float32; on the CPU everything is float32.
    device_type = device.split(":")[0]
    if config.dtype == "auto":
        amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device_type == "cuda" else None
    else:
        amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
    base_dtype = amp_dtype if device_type == "cuda" and amp_dtype is not None and config.method != "full" else torch.float32
    scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)

    # 2. Model: pretrained weights, then the adapter. KaSA's SVD truncation happens here, on every
    #    rank (the SVD is deterministic, and DDP also broadcasts rank 0's weights), or, on --resume,
    #    the saved truncation and adapter are loaded instead (no SVD).
    model, tokenizer = load_pretrained(config.model, dtype=base_dtype, device=device)
    checkpoint_path = out_dir / "checkpoint.pt"
    resumed = None
    if config.resume:
        if not checkpoint_path.exists():
            sys.exit(f"--resume: no checkpoint at {checkpoint_path}; run without --resume to start fresh")
        resumed = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if resumed["config"] != {**dataclasses.asdict(config), "resume": False}:
            changed = {k: v for k, v in dataclasses.asdict(config).items() if resumed["config"].get(k) != v}
            log(f"note: resuming with changed settings {changed}")
    task = TASKS[config.task](config, model, tokenizer)
    calibration = None  # both criteria's inputs: the activation criterion's, and the report's side by side
    if resumed is None and config.method == "kasa" and config.calibration_batches > 0 and (
            config.truncation_criterion == "activation" or config.truncation_report):
        calibration = calibration_statistics(model, task, config, device, amp_dtype)
    replaced = adapt_model(model, config, calibration) if resumed is None or config.method == "full" else \
        kasa.load_kasa_state_dict(model, resumed["adapter"], dropout=config.adapter_dropout)
    if resumed is not None and config.method == "full":
        model.load_state_dict(resumed["model"])
    if resumed is None and config.method == "kasa" and config.truncation_report and is_main:
        report_truncation(model, task.probe_batches, device, amp_dtype, out_dir, calibration)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if task.head is not None:  # outside the model, so apply_kasa's freezing leaves it trainable
        if resumed is not None:
            task.head.load_state_dict(resumed["head"])
        trainable += list(task.head.parameters())
    log(f"{config.method} on {len(replaced)} layers (r={config.r}, α={config.alpha}): "
        f"{sum(p.numel() for p in trainable):,} trainable of {model.num_params():,} parameters"
        + (f"; {world} processes" if world > 1 else ""))
    if is_main:
        write_text_atomic(out_dir / "config.json", json.dumps(dataclasses.asdict(config), indent=2))
    task_loss_module = TaskLoss(model, task.head, task.loss)
    if world > 1:  # after the adapter exists, so every rank has the same truncated base and the same trainables
        task_loss_module = DistributedDataParallel(task_loss_module, device_ids=None if device == "cpu" else [device])

    # 3. Data: each epoch's order is fixed by (seed, epoch), so a resumed run sees exactly the
    #    batches an uninterrupted one would. A global batch of world × batch_size examples is dealt
    #    out round-robin: rank i takes examples i, i + world, ...
    train_examples = task.train_examples[:config.max_train_examples or None]
    global_batch = config.batch_size * world
    batches_per_epoch = math.ceil(len(train_examples) / global_batch)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = min(math.inf if config.max_steps is None else config.max_steps, steps_per_epoch * config.epochs)

    def micro_batches(start: int):
        """Yields (epoch, this rank's batch, whether it holds examples). The last global batch of an
        epoch may leave a rank without examples: it then computes on one borrowed example with
        weight zero, so that every rank still takes part in the gradient all-reduce."""
        epoch, first = divmod(start, batches_per_epoch)
        while True:
            order = torch.randperm(len(train_examples), generator=torch.Generator().manual_seed(config.seed + epoch))
            for index in range(first, batches_per_epoch):
                chunk = order[index * global_batch:(index + 1) * global_batch]
                mine = chunk[rank::world]
                yield epoch, task.collate([train_examples[i] for i in (mine if len(mine) else chunk[:1])]), len(mine) > 0
            epoch, first = epoch + 1, 0

    # 4. Optimizer and schedule: linear warmup, then linear decay to zero.
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)

    warmup_steps = round(config.warmup_ratio * total_steps) if config.warmup_ratio > 0 else config.warmup_steps
    if 0 < total_steps <= warmup_steps:
        log(f"note: the warmup ({warmup_steps} steps) is not shorter than the run ({total_steps} steps), so the "
            f"learning rate never reaches --lr {config.lr:g}; for short runs pass e.g. --warmup-steps "
            f"{max(1, total_steps // 10)}")

    def lr_factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    step, history, evaluations = 0, [], []  # evaluations: the dev scores after each epoch (tasks with select_by)
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        torch.set_rng_state(resumed["rng"]["cpu"])
        if device_type == "cuda" and resumed["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(resumed["rng"]["cuda"])
        step, history, evaluations = resumed["step"], resumed["history"], resumed.get("evaluations", [])
        log(f"resumed from {checkpoint_path} at step {step}")

    def save_checkpoint():
        save_atomic({
            "adapter": kasa.kasa_state_dict(model) if replaced else {},
            "model": model.state_dict() if config.method == "full" else {},
            "head": task.head.state_dict() if task.head is not None else {},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None},
            "step": step,
            "history": history,
            "evaluations": evaluations,
            "config": {**dataclasses.asdict(config), "resume": False},
        }, checkpoint_path)

    def score() -> dict:
        """The task's metrics for the model as it is now, labelled with the epochs trained so far."""
        return {**task.evaluate(model, out_dir), "epoch": round(step / steps_per_epoch, 2)}

    def all_ranks_sum(*values: float) -> list:
        if world == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.tolist()

    # 5. Train. One optimizer step averages the task loss over every loss unit (E2E: target token)
    #    of its grad_accum micro-batches on all ranks, so it equals one big batch's loss however
    #    the batch is split. DDP averages gradients over ranks, hence the factor world.
    regularize = bool(replaced) and (config.beta > 0 or config.gamma > 0)
    batches = micro_batches(start=step * config.grad_accum)
    model.train()
    tokens_seen, start_time, start_step = 0, time.time(), step
    while step < total_steps:
        micro = [next(batches) for _ in range(config.grad_accum)]
        units = [task.loss_units(batch) if has_examples else 0 for _, batch, has_examples in micro]
        (step_units,) = all_ranks_sum(sum(units))
        task_loss_sum, step_tokens = 0.0, 0
        for i, ((epoch, batch, _), batch_units) in enumerate(zip(micro, units)):
            batch = {k: v.to(device) for k, v in batch.items()}
            last = i == config.grad_accum - 1  # DDP all-reduces the summed gradients after the last backward only
            with contextlib.nullcontext() if world == 1 or last else task_loss_module.no_sync():
                with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    task_loss = task_loss_module(batch)
                l2, l3 = kasa.kasa_regularization(model) if regularize else (torch.zeros(()), torch.zeros(()))
                # Eq. 11 for the whole step: the task loss weighted by this batch's share of the step's
                # units, the regularizer once in total (1 / grad_accum per micro-batch).
                loss = (task_loss.float() * (batch_units * world / step_units)
                        + (config.beta * l2 + config.gamma * l3) / config.grad_accum)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"step {step}: the loss is {loss.item()} (task {task_loss.item()}, l2 {l2.item()}, "
                        f"l3 {l3.item()}); the last good checkpoint is {checkpoint_path}. Try a lower --lr, "
                        "--grad-clip 1.0, or --dtype float32.")
                scaler.scale(loss).backward()
            task_loss_sum += task_loss.item() * batch_units / step_units
            step_tokens += int(batch["attention_mask"].sum())
        if config.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        step_loss, step_tokens = all_ranks_sum(task_loss_sum, step_tokens)
        tokens_seen += step_tokens
        history.append({"step": step, "epoch": epoch, "loss": step_loss, "l2": l2.item(), "l3": l3.item(),
                        "lr": scheduler.get_last_lr()[0]})
        if step % config.log_every == 0 or step == total_steps:
            elapsed = time.time() - start_time
            eta = elapsed / (step - start_step) * (total_steps - step)
            log(f"step {step}/{total_steps} | loss {step_loss:.4f} | l2 {l2.item():.3f} | l3 {l3.item():.3f} "
                f"| lr {scheduler.get_last_lr()[0]:.2e} | {tokens_seen / elapsed:,.0f} tok/s | "
                f"ETA {format_seconds(eta)}", flush=True)
        if is_main and config.eval and task.select_by and step % steps_per_epoch == 0 and step < total_steps:
            model.eval()  # the last epoch is scored below, on the merged model
            evaluations.append(score())
            model.train()
            log(f"dev after epoch {evaluations[-1]['epoch']:g}: {evaluations[-1]}", flush=True)
        if is_main and (step % config.save_every == 0 or step == total_steps):
            save_checkpoint()
    if world > 1:
        dist.destroy_process_group()
    if not is_main:
        return None
    write_text_atomic(out_dir / "history.json", json.dumps(history, indent=1))
    if replaced:
        save_safetensors(kasa.kasa_state_dict(model), out_dir / "adapter.safetensors")
    if task.head is not None:
        save_safetensors(task.head.state_dict(), out_dir / "head.safetensors")
    print(f"trained {step} steps; checkpoint in {checkpoint_path}")
    if history:  # nothing to draw after --max-steps 0
        evaluation.write_plots(out_dir)
    if config.export:
        save_hf_checkpoint(model, tokenizer, out_dir / "export" / "hf")
        if replaced:
            save_peft_adapter(model, out_dir / "export" / "peft", base_model_name_or_path=config.model)
        print(f"exported to {out_dir / 'export'}: hf/ (merged, for transformers) "
              + ("and peft/ (a LoRA adapter for the original model)" if replaced else ""))

    # 6. Evaluate: merge ΔW into the weights (zero added latency), decode, score.
    if not config.eval:
        return None
    model.eval()
    if replaced:
        kasa.merge_kasa(model)
    metrics = final = score()
    if task.select_by:  # the final epoch and the best one, each with its epoch (the paper reports the best)
        best = max(evaluations + [final], key=lambda scores: scores[task.select_by])
        metrics = {**{f"final_{k}": v for k, v in final.items()}, **{f"best_{k}": v for k, v in best.items()}}
    metrics["train_steps"] = step
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    print("\n| metric | value |\n|---|---|")
    for name, value in metrics.items():
        print(f"| {name} | {value if not isinstance(value, float) else f'{value:.4f}'} |")
    print(f"\nmetrics: {out_dir / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
