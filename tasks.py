"""What train.py trains, and with which settings: the flags with their help and ranges, the presets
(the paper's hyperparameters per task), and the tasks themselves (a batch, its loss, the scoring).

  TrainConfig   every flag of train.py: its default, help text, allowed values, and whether --resume
                may change it, all in one place (the dataclass field's metadata)
  PRESETS       task -> the TrainConfig values that differ from its defaults (the paper's E2E setting)
  parse_config  the task's preset, then the flags given; every value checked before anything is loaded
  adapt_model   the method (KaSA, or a baseline: LoRA, PiSSA, MiLoRA, full fine-tuning) on the model
  report_truncation  what KaSA's SVD truncation costs this model, measured before training
  Task          what the training loop needs from a task
  e2e_task      E2E NLG: (MR, reference) sequences, loss on the reference, beam search, five metrics
  glue_task     GLUE: model.ClassificationHead, cross-entropy (MSE for STS-B), dev metrics
  TASKS         task name -> the function that builds its Task
  validate      --eval-every: score the training model on held-out data, into the history
"""
import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import eval as evaluation
import files
import kasa
import metrics
from errors import ConfigError
from model import ClassificationHead

# -----------------------------------------------------------------------------
# Presets

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

# The metric that picks the best epoch, as in the official KaSA GLUE script.
GLUE_SELECT_BY = {"cola": "matthews", "sst2": "accuracy", "mrpc": "accuracy", "qnli": "accuracy",
                  "rte": "accuracy", "stsb": "pearson"}


def cpu_note(config) -> str | None:
    """What to run instead when the paper's full setting (the preset's model, no --max-steps) is asked of a CPU."""
    if config.max_steps is not None or config.model != TrainConfig(**PRESETS[config.task]).model:
        return None
    return (f"note: this is the paper's full setting ({config.model}, {config.epochs} epochs): it needs a GPU, and "
            "on this CPU it takes days. A CPU-sized run (a small model, a few hundred steps, minutes):\n  python "
            f"train.py --task {config.task} --model HuggingFaceTB/SmolLM2-135M-Instruct --max-steps 100 " + (
                "--warmup-ratio 0.06 --max-eval-examples 50 --num-beams 4" if config.task == "e2e" else "--batch-size 8"))



# -----------------------------------------------------------------------------
# Settings: every flag is a TrainConfig field; its help, its range and whether --resume may change
# it live in the field's metadata, so --help, the checks and the resume check share one source.


@dataclass(frozen=True)
class Range:
    """The finite numbers from low to high; an open end excludes the bound itself."""
    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value) -> bool:
        return (math.isfinite(value) and (value > self.low if self.open_low else value >= self.low)
                and (value < self.high if self.open_high else value <= self.high))

    def __str__(self) -> str:
        if self.high == math.inf:
            return "finite" if self.low == -math.inf else f"{'>' if self.open_low else '≥'} {self.low:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"


AT_LEAST_0, AT_LEAST_1, POSITIVE, FRACTION = Range(0), Range(1), Range(0, open_low=True), Range(0, 1, open_high=True)
METHODS = ("kasa", "lora", "pissa", "milora", "full")
TARGET_PRESETS = {"qv": ("q_proj", "v_proj"), "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj")}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_fc", "c_proj")


def flag(default, help: str, valid=None, unset: str = None, resumable: bool = False):
    """A TrainConfig field: its default, its --help text, the values it takes (a Range or a tuple of
    choices), what None means, and whether --resume may change it (if not, it must equal the checkpoint's)."""
    return field(default=default, metadata=dict(help=help, valid=valid, unset=unset, resumable=resumable))


@dataclass
class TrainConfig:
    task: str = flag("e2e", "the task; it picks the preset of every other default", tuple(PRESETS))
    model: str = flag("gpt2-medium", "hub id, local Hugging Face directory, or .gguf file")
    data_dir: str = flag(None, "local data files instead of the download cache", unset="download", resumable=True)
    data_version: str = flag("original", "the E2E release", ("original", "cleaned"))
    out_dir: str = flag(None, "the run directory", unset="runs/<task>", resumable=True)
    # the adapter (kasa.py)
    method: str = flag("kasa", "KaSA, or a baseline on the same loop", METHODS)
    targets: tuple = flag(("q_proj", "v_proj"), "layers to adapt: names, or a preset qv | qkvo | all (every linear "
                          "layer in the blocks)")
    r: int = flag(4, "adapter rank r", AT_LEAST_1)
    alpha: float = flag(32.0, "α: the update is scaled by α/r", POSITIVE)
    adapter_dropout: float = flag(0.1, "dropout on the adapter's input", FRACTION)
    truncation: int = flag(None, "singular triplets dropped per layer (0: no truncation; KaSA only)", AT_LEAST_0,
                           unset="r, the paper's")
    untruncated_targets: tuple = flag((), "targets KaSA adapts without truncating (those the truncation report "
                                      "shows it hurts)")
    learn_sigma: bool = flag(True, "learn Δσ (--no-learn-sigma: fixed at 1, an ablation)")
    truncation_criterion: str = flag("sigma", "which triplets KaSA's step 1 drops: the smallest σ (the paper), or "
                                     "those adding the least output energy on calibration inputs (not the paper's)",
                                     ("sigma", "activation"))
    calibration_batches: int = flag(4, "batches of training examples, drawn with --seed and run one example at a "
                                    "time, whose layer inputs E[xxᵀ] the activation criterion and the truncation "
                                    "report use (0: none)", AT_LEAST_0)
    truncation_report: bool = flag(True, "measure what the SVD truncation costs before training", resumable=True)
    beta: float = flag(1e-4, "weight of L2 = Σ‖Δσ‖² (Eq. 11); 0 for the other methods unless given", AT_LEAST_0)
    gamma: float = flag(1e-3, "weight of L3 = Σ‖BᵀB − I‖² + ‖AAᵀ − I‖² (Eq. 11); 0 for the other methods unless "
                        "given", AT_LEAST_0)
    # optimization
    lr: float = flag(2e-4, "AdamW learning rate", POSITIVE)
    weight_decay: float = flag(0.01, "AdamW weight decay", AT_LEAST_0)
    batch_size: int = flag(8, "examples per micro-batch and process (N processes train on N × this)", AT_LEAST_1)
    grad_accum: int = flag(1, "micro-batches per optimizer step", AT_LEAST_1)
    epochs: int = flag(5, "passes over the training set", AT_LEAST_1)
    warmup_steps: int = flag(500, "steps of linear warmup", AT_LEAST_0)
    warmup_ratio: float = flag(0.0, "> 0: warm up over this fraction of all steps instead", FRACTION)
    label_smoothing: float = flag(0.1, "label smoothing of the task loss", FRACTION)
    grad_clip: float = flag(0.0, "clip the gradient norm at this (0: no clipping)", AT_LEAST_0)
    max_steps: int = flag(None, "stop after this many optimizer steps (0: evaluate only)", AT_LEAST_0,
                          unset="all epochs", resumable=True)
    max_train_examples: int = flag(None, "train on the first N examples only", AT_LEAST_1, unset="all")
    max_len: int = flag(512, "tokens per training example; longer ones lose their end", Range(2))
    seed: int = flag(110, "seed of the adapter init, the dropout and the data order", AT_LEAST_0)
    group_by_length: bool = flag(False, "batch examples of similar length (shuffled, sorted within chunks of "
                                 "50 batches, batches shuffled): less padding, the same seeded order on --resume")
    # bookkeeping
    log_every: int = flag(10, "print a progress line every N steps", AT_LEAST_1, resumable=True)
    save_every: int = flag(1000, "write checkpoint.pt every N steps (and at the end)", AT_LEAST_1, resumable=True)
    resume: bool = flag(False, "continue the run in --out-dir from its checkpoint.pt", resumable=True)
    dtype: str = flag("auto", "auto: bf16 (or fp16) autocast on CUDA, float32 on the CPU",
                      ("auto", "float32", "bfloat16", "float16"))
    export: bool = flag(False, "also write RUN_DIR/export/hf (merged) and export/peft (LoRA of rank r+t)",
                        resumable=True)
    # evaluation (the LoRA paper's E2E decoding)
    eval: bool = flag(True, "decode and score after training (GLUE: the dev set after every epoch too)", resumable=True)
    num_beams: int = flag(10, "beam width (1: greedy)", AT_LEAST_1, resumable=True)
    length_penalty: float = flag(0.9, "beam score = log p / length^this", Range(), resumable=True)
    no_repeat_ngram_size: int = flag(4, "never repeat an n-gram of this size (0: off)", AT_LEAST_0, resumable=True)
    max_new_tokens: int = flag(64, "tokens decoded per MR at most", AT_LEAST_1, resumable=True)
    eval_batch_size: int = flag(8, "examples per evaluation batch", AT_LEAST_1, resumable=True)
    max_eval_examples: int = flag(None, "score only the first N unique test MRs (GLUE: dev rows)", AT_LEAST_1,
                                  unset="all", resumable=True)
    # periodic validation (never model selection: the test score is the last step's)
    eval_every: int = flag(0, "score the unmerged model every N steps and at the last one, into history.json's "
                           "'validation' entries and plots/validation.png (0: off; E2E: greedy BLEU and the "
                           "loss on the --val-mrs MRs; GLUE: the dev metrics)", AT_LEAST_0, resumable=True)
    val_mrs: int = flag(0, "E2E validation MRs: with a train split, the first N dev MRs (0: all); training on the "
                        "dev set, N dev MRs held out of training, seeded and the same for every run (needed by "
                        "--eval-every)", AT_LEAST_0)


def show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def parse_config(argv=None, description: str = None) -> TrainConfig:
    """The task's preset, then the flags given (--help shows the chosen task's defaults), checked."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--task", default=TrainConfig.task)
    task = first.parse_known_args(argv)[0].task
    preset = PRESETS.get(task, {})
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"Defaults shown are --task {task}'s; `--task T --help` shows task T's.")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback (or KASA_DEBUG=1)")
    for f in dataclasses.fields(TrainConfig):
        default, valid = preset.get(f.name, f.default), f.metadata["valid"]
        allowed = f"{valid}; " if isinstance(valid, Range) else f"{' | '.join(valid)}; " if valid else ""
        shown = f.metadata["unset"] if default is None else show(default)
        text = f"{f.metadata['help']} ({allowed}default: {shown}{f', the {task} preset' if f.name in preset else ''})"
        kind = (dict(action=argparse.BooleanOptionalAction) if f.type is bool else
                dict(type=lambda s: tuple(t for t in s.split(",") if t), metavar="A,B") if f.type is tuple else
                dict(type=f.type, metavar={int: "N", float: "X"}.get(f.type, f.name.upper())))
        parser.add_argument(flag_name(f), default=None, help=text.replace("%", "%%"), **kind)
    args = vars(parser.parse_args(argv))
    args.pop("debug")
    if task not in PRESETS:
        raise ConfigError(f"--task {task}: unknown; choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in args.items() if v is not None}
    values = {**preset, **given}
    if values.get("method", TrainConfig.method) != "kasa":
        # L2 and L3 are KaSA's regularizers (Eq. 11): LoRA, PiSSA and MiLoRA train without them, as
        # in their papers, unless --beta / --gamma ask for them (e.g. to ablate L3 on LoRA).
        values.update(beta=given.get("beta", 0.0), gamma=given.get("gamma", 0.0))
    config = TrainConfig(**values)
    config.out_dir = config.out_dir or f"runs/{config.task}"
    validate_config(config)
    return config


def validate_config(config: TrainConfig):
    """Every value in its range, every choice a known one, the paths there: all problems at once."""
    problems = []
    for f in dataclasses.fields(config):
        value, valid = getattr(config, f.name), f.metadata["valid"]
        if value is None or valid is None:
            continue
        if isinstance(valid, Range) and value not in valid:
            problems.append(f"{flag_name(f)} {show(value)}: must be {valid}")
        elif isinstance(valid, tuple) and value not in valid:
            problems.append(f"{flag_name(f)} {value}: unknown; choose one of {', '.join(valid)}")
    preset = len(config.targets) == 1 and config.targets[0] in (*TARGET_PRESETS, "all")
    unknown = [t for t in config.targets if t not in PROJECTIONS] if not preset else []
    if not config.targets or unknown:
        problems.append(f"--targets {show(config.targets)}: give a preset (qv, qkvo, all) or layer names "
                        f"among {', '.join(PROJECTIONS)}")
    targets = PROJECTIONS if config.targets == ("all",) else TARGET_PRESETS.get(config.targets[0], config.targets) \
        if preset else config.targets
    if config.untruncated_targets and (config.method != "kasa" or set(config.untruncated_targets) - set(targets)):
        problems.append(f"--untruncated-targets {show(config.untruncated_targets)}: each must be one of the "
                        f"--targets ({show(targets)}), and only --method kasa truncates")
    if config.val_mrs and config.task != "e2e":
        problems.append(f"--val-mrs {config.val_mrs}: E2E only (GLUE validates on its dev rows, --max-eval-examples)")
    if config.truncation is not None and config.method != "kasa":
        problems.append(f"--truncation {config.truncation}: only --method kasa truncates")
    if config.truncation_criterion == "activation" and (config.method != "kasa" or config.calibration_batches < 1):
        problems.append("--truncation-criterion activation: needs --method kasa and --calibration-batches ≥ 1")
    model = Path(config.model).expanduser()
    if not model.exists() and (config.model.startswith((".", "/", "~")) or config.model.endswith(".gguf")):
        problems.append(f"--model {config.model}: no such file or directory")
    if config.data_dir is not None and not Path(config.data_dir).is_dir():
        problems.append(f"--data-dir {config.data_dir}: no such directory")
    if Path(config.out_dir).exists() and not Path(config.out_dir).is_dir():
        problems.append(f"--out-dir {config.out_dir}: is a file, not a directory")
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "\n  ".join(["invalid settings:", *problems]))


def resume_differences(saved: dict, config: TrainConfig) -> tuple[list, list]:
    """The settings of `config` that differ from a checkpoint's (saved: its config as a dict), as
    '--flag old -> new': those --resume may not change, and those it may."""
    fixed, changed = [], []
    for f in dataclasses.fields(TrainConfig):
        before, now = saved.get(f.name, f.default), getattr(config, f.name)  # a missing field: its default
        if f.name != "resume" and (tuple(before) if isinstance(before, list) else before) != now:
            (changed if f.metadata["resumable"] else fixed).append(f"{flag_name(f)} {show(before)} -> {show(now)}")
    return fixed, changed


# -----------------------------------------------------------------------------
# Methods: which layers to adapt, how each method adapts them, and what the truncation costs


def resolve_targets(targets: tuple, model: nn.Module) -> tuple:
    """Target names for apply_kasa; 'all' is every nn.Linear inside the transformer blocks."""
    if len(targets) == 1 and targets[0] == "all":
        return tuple(sorted({name.rpartition(".")[2] for name, m in model.named_modules()
                             if isinstance(m, nn.Linear) and name.startswith("blocks.")}))
    return TARGET_PRESETS.get(targets[0], targets) if len(targets) == 1 else targets


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


def calibration_statistics(model: nn.Module, task, config: TrainConfig, device: str, amp_dtype) -> dict:
    """E[xxᵀ] of every target layer's inputs (kasa.collect_input_statistics) on --calibration-batches ×
    --batch-size training examples drawn with --seed, each run alone (no padding)."""
    examples = task.train_examples[:config.max_train_examples or None]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed))
    chosen = [examples[i] for i in order[:config.calibration_batches * config.batch_size].tolist()]

    def run_batches():
        for example in chosen:
            batch = task.collate([example])
            with torch.autocast(device.split(":")[0], dtype=amp_dtype, enabled=amp_dtype is not None):
                model.hidden_states(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    return kasa.collect_input_statistics(model, resolve_targets(config.targets, model), run_batches)


def adapt_model(model: nn.Module, config: TrainConfig, calibration: dict = None) -> list:
    """Apply the method to the model; returns the adapted layer names (empty for full fine-tuning).
    calibration: calibration_statistics's E[xxᵀ] per target, for --truncation-criterion activation."""
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
        raise ConfigError(f"--untruncated-targets {','.join(config.untruncated_targets)}: each must be one of the "
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


def report_truncation(model, probe_batches: list, device: str, amp_dtype, out_dir: Path, log=print,
                      calibration: dict = None) -> dict:
    """Step 1's cost on this model, measured before training (kasa.truncation_report), printed worst
    layers first and saved as RUN_DIR/truncation_report.json. It only reports: a warning names the
    layers, and train.py adds the flags that avoid them; the run goes on as configured."""
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in probe_batches]

    def text_loss(batch):  # the mean next-token loss over every real token: how well the model knows the text
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        return model.loss(input_ids[:, :-1], input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100),
                          attention_mask=mask[:, :-1])

    def compute_loss():
        with torch.autocast(device.split(":")[0], dtype=amp_dtype, enabled=amp_dtype is not None):
            return sum(text_loss(batch).float() for batch in batches) / len(batches)
    report = kasa.truncation_report(model, compute_loss, calibration=calibration)  # with it: both criteria
    log(kasa.format_truncation_report(report))
    if report["warning"]:  # kasa.py's warning names its own API; here are the same choices as flags
        harmless, harmful = report["harmless_targets"], report["harmful_targets"]
        ways = [f"--targets {','.join(harmless)}", f"--untruncated-targets {','.join(harmful)}"] if harmless else []
        log("With train.py: " + ", or ".join(ways + ["--truncation 0"]) + ".")
    files.write_text_atomic(out_dir / "truncation_report.json", json.dumps(report, indent=1))
    return report


def validate(task, model: nn.Module, out_dir: Path, history: list, log=print):
    """--eval-every: the unmerged model (it is training) scored on data the run does not train on,
    kept in the last history entry (so the checkpoint holds it for --resume) and history.json
    rewritten, so that a running sweep can read the curve so far. Never used to pick a model."""
    model.eval()  # no dropout, and nothing drawn from the RNG: a resumed run stays exact
    start = time.time()
    scores = task.validate(model, Path(out_dir) / "validation")
    model.train()
    history[-1]["validation"] = {**scores, "seconds": round(time.time() - start, 1)}
    files.write_text_atomic(Path(out_dir) / "history.json", json.dumps(history, indent=1))
    log(f"validation at step {history[-1]['step']}: " + " | ".join(
        f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)) + f" ({time.time() - start:.0f} s)")


# -----------------------------------------------------------------------------
# Tasks: what a batch is, its loss, and how the trained model is scored


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
    validate: Callable = None             # (model, out_dir) -> scores on data the run does not train on (--eval-every)
    length: Callable = lambda example: len(example[0])  # tokens in one example (--group-by-length)


def require_tokenizer(config, tokenizer):
    if tokenizer is None:
        raise ConfigError(f"--model {config.model} ships no tokenizer; --task {config.task} needs one "
                          "(tokenizer.json, vocab.json + merges.txt, or a GGUF with a gpt2-style vocabulary)")


VALIDATION_SEED = 0  # the held-out dev MRs do not depend on --seed: every run validates on the same MRs


def hold_out_mrs(examples: list, n: int) -> tuple[list, list]:
    """(training rows, validation groups): n MRs drawn with a fixed seed, every row of theirs removed
    from training, so that no validation MR's references are trained on. Groups in file order."""
    groups = data.group_references(examples)
    if n >= len(groups):
        raise ConfigError(f"--val-mrs {n}: the split has {len(groups)} MRs, so none would be left to train on; "
                          f"give fewer, e.g. --val-mrs 50")
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(VALIDATION_SEED)).tolist()
    held = {groups[i][0] for i in order[:n]}
    return [ex for ex in examples if ex.mr not in held], [group for group in groups if group[0] in held]


# The E2E scorer's metrics but METEOR: its Java scorer takes ~20 s to start, at every validation.
VALIDATION_METRICS = {"BLEU": metrics.bleu_score, "NIST": metrics.nist_score, "ROUGE_L": metrics.rouge_l_score,
                      "CIDEr": metrics.cider_score}


def e2e_validator(config, model, tokenizer, groups: list) -> Callable:
    """--eval-every on E2E: greedy decoding scored on `groups` (MRs the run does not train on), and
    the teacher-forced loss on their references (no label smoothing: the plain per-token loss)."""
    eos_id, pad_id = data.eos_and_pad_ids(model.config)
    pairs = [data.encode_e2e_example(tokenizer, mr, ref, eos_id, config.max_len) for mr, refs in groups for ref in refs]
    prompts = [data.encode_e2e_context(tokenizer, mr, eos_id) for mr, _ in groups]
    greedy = evaluation.BeamSearchConfig(num_beams=1, max_new_tokens=config.max_new_tokens,
                                         no_repeat_ngram_size=config.no_repeat_ngram_size)

    @torch.no_grad()
    def validate(model, out_dir) -> dict:
        device = model.lm_head.weight.device
        amp_dtype, _ = evaluation.run_precision(config.dtype, device.type, config.method)
        loss_sum, units = 0.0, 0
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for start in range(0, len(pairs), config.eval_batch_size):
                batch = {k: v.to(device) for k, v in
                         data.collate_e2e(pairs[start:start + config.eval_batch_size], pad_id=pad_id).items()}
                n = int((batch["targets"] != -100).sum())
                loss_sum += model.loss(batch["input_ids"], batch["targets"], batch["attention_mask"]).item() * n
                units += n
            hyps = evaluation.generate_texts(model, tokenizer, prompts, eos_id, greedy, config.eval_batch_size)
        metrics.write_hypotheses(Path(out_dir) / "predictions.txt", hyps)
        refs = [refs for _, refs in groups]
        return {"loss": loss_sum / units, **{name: score(hyps, refs) for name, score in VALIDATION_METRICS.items()},
                "eval_mrs": len(groups)}
    return validate


def e2e_task(config, model, tokenizer) -> Task:
    """E2E NLG: LoRA-style (MR, reference) sequences, loss on the reference tokens only. Offline
    there is no train split: the run trains on the dev set (and --eval-every validates on --val-mrs
    dev MRs held out of it); with one, it trains on train and validates on the first dev MRs."""
    require_tokenizer(config, tokenizer)
    eos_id, pad_id = data.eos_and_pad_ids(model.config)
    paths = data.resolve_e2e_files(config.data_version, config.data_dir)
    validation = []
    if paths["train"] is None:
        rows = data.load_e2e_split(paths["dev"])
        print(f"note: no E2E training split in {config.data_dir}; training on the dev set "
              f"({paths['dev'].name}) and evaluating on the test set")
        if config.eval_every and not config.val_mrs:
            raise ConfigError("--eval-every without a train split needs validation MRs held out of the dev set "
                              "it trains on: add e.g. --val-mrs 50")
        if config.val_mrs:
            rows, validation = hold_out_mrs(rows, config.val_mrs)
            print(f"note: {len(validation)} dev MRs ({sum(len(refs) for _, refs in validation)} references, "
                  f"seed {VALIDATION_SEED}) are held out of training for validation; training on the other "
                  f"{len(rows)} dev rows")
    else:
        rows = data.load_e2e_split(paths["train"])
        if config.eval_every:
            validation = data.group_references(data.load_e2e_split(paths["dev"]))[:config.val_mrs or None]
    train = [data.encode_e2e_example(tokenizer, ex.mr, ex.ref, eos_id, config.max_len) for ex in rows]
    collate = lambda examples: data.collate_e2e(examples, pad_id=pad_id)  # noqa: E731

    def loss(model, batch):
        return model.loss(batch["input_ids"], batch["targets"], attention_mask=batch["attention_mask"],
                          label_smoothing=config.label_smoothing)  # lm_head at target positions only

    # The one E2E evaluation (eval.py), the same as `eval.py --checkpoint`; it reads the test set now.
    evaluate = evaluation.e2e_evaluator(config, tokenizer)
    validate = e2e_validator(config, model, tokenizer, validation) if validation else None
    return Task(train, collate, loss, lambda batch: int((batch["targets"] != -100).sum()), evaluate,
                probe_batches=[collate(train[i:i + 8]) for i in (0, 8)], validate=validate)


def glue_task(config, model, tokenizer) -> Task:
    """GLUE: a sentence (or pair) -> class scores with cross-entropy, or for STS-B one similarity
    score with MSE, from a linear head on the last real token; scored on the dev set."""
    require_tokenizer(config, tokenizer)
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
        files.write_text_atomic(out_dir / "dev_predictions.tsv", "prediction\tlabel\n" + "".join(
            f"{prediction}\t{label}\n" for prediction, label in zip(predictions, labels)))
        return evaluation.glue_metrics(config.task, predictions, labels)

    return Task(train, collate, loss, lambda batch: len(batch["labels"]), evaluate,
                probe_batches=[collate(train[i:i + 8]) for i in (0, 8)],
                head=head, select_by=GLUE_SELECT_BY[config.task], validate=evaluate)  # --eval-every: the dev metrics


TASKS = {"e2e": e2e_task, **{task: glue_task for task in data.GLUE_TASKS}}
