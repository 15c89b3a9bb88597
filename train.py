"""Fine-tune a language model with KaSA, then decode and score: `python train.py --task e2e`,
or classify: `python train.py --task sst2` (GLUE: cola, sst2, mrpc, qnli, rte, stsb).

A plain PyTorch loop in six steps, numbered alike here, in the section rulers and in main():
  1. config: the task's preset (the paper's setting), then the flags given, all checked before
     anything is loaded (tasks.py), and on --resume against the checkpoint's
  2. model: a pretrained checkpoint, then KaSA on the target projections (kasa.py), or a baseline
     (--method lora|pissa|milora|full) on the same loop, data and budget
  3. data: tokenized examples (tasks.py), a seeded order per epoch (so --resume is exact)
  4. optimizer: AdamW, warmup + linear decay; the run says what it will do before it starts
  5. train: loss = task + β·L2 + γ·L3 (Eq. 11), gradient accumulation, atomic checkpoints
  6. evaluate: merge ΔW into W_world (zero added latency), decode the test set, score it (eval.py);
     GLUE scores its dev set after every epoch too, and reports the final and the best epoch;
     --eval-every N validates the training model every N steps (tasks.validate, never model selection)
CUDA when available (bf16 autocast, or fp16 with a GradScaler), else the CPU; `torchrun
--nproc_per_node=N train.py ...` trains on N processes (DDP). A run directory (--out-dir, default
runs/<task>) ends up holding config.json, truncation_report.json, checkpoint.pt (adapter, optimizer,
RNG, data position), adapter.safetensors, history.json, plots/, metrics.json, and the task's outputs
(E2E: predictions.txt, references.txt; GLUE: head.safetensors, dev_predictions.tsv); --export adds
export/hf (merged) and export/peft. A bad flag or file stops with `error: ...` (exit 2; --debug: traceback).
"""
import contextlib
import dataclasses
import datetime
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import errors
import eval as evaluation
import files
import kasa
from errors import CheckpointError, ConfigError, LossNotFinite
from files import write_text_atomic  # noqa: F401 - bench scripts import it from here
from model import load_pretrained, save_hf_checkpoint, save_peft_adapter
from tasks import (GLUE_SELECT_BY, PRESETS, TASKS, Task, TrainConfig,  # noqa: F401 - bench/sweep.py reads
                   adapt_model, calibration_statistics, cpu_note, parse_config, report_truncation,  # PRESETS and
                   resume_differences, validate)  # GLUE_SELECT_BY here

# -----------------------------------------------------------------------------
# 1. Config: the flags (tasks.parse_config checks them all), the process and device, and on --resume
#    the checkpoint, checked against the config before anything else is loaded


@dataclass
class Run:
    """Where and how this process trains, fixed at the start: the config, the process, the device."""
    config: TrainConfig
    rank: int                             # rank 0 alone prints, writes checkpoints and evaluates
    world: int
    device: str
    amp_dtype: torch.dtype = None         # the autocast dtype; None: float32
    base_dtype: torch.dtype = torch.float32  # the frozen base's storage dtype

    is_main = property(lambda self: self.rank == 0)
    device_type = property(lambda self: self.device.split(":")[0])
    out_dir = property(lambda self: Path(self.config.out_dir))
    checkpoint_path = property(lambda self: self.out_dir / "checkpoint.pt")

    def log(self, *args):
        if self.is_main:
            print(*args, flush=True)


def init_distributed():
    """(rank, world size, device) under torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK), or one process."""
    world, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return 0, 1, device
    if device != "cpu":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device != "cpu" else "gloo")
    return dist.get_rank(), world, device


def start_run(config: TrainConfig) -> Run:
    """The process, the device and the precision (runs.run_precision: the same rule as `eval.py
    --checkpoint`, so a run scores the same both ways); the run directory; the seed."""
    run = Run(config, *init_distributed())
    run.amp_dtype, run.base_dtype = evaluation.run_precision(config.dtype, run.device_type, config.method)
    if run.is_main:
        files.make_out_dir(run.out_dir)  # removing the half-written files of a killed run
    if run.device_type == "cpu" and (note := cpu_note(config)):  # the paper's setting: what to run instead
        run.log(note)
    torch.manual_seed(config.seed)          # the same seed on every rank: the same adapter init
    return run


CHECKPOINT_KEYS = ("adapter", "model", "head", "optimizer", "scheduler", "scaler", "rng", "step", "history", "config")


def load_checkpoint(run: Run) -> dict:
    """--resume: RUN_DIR/checkpoint.pt, loaded safely (weights_only: a pickle never runs code), and
    its settings checked against this run's before anything else is loaded."""
    path, fix = run.checkpoint_path, "delete it to train afresh, or point --out-dir elsewhere"
    if not path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {path}; run without --resume to train afresh")
    with errors.reading(path, CheckpointError, fix):
        checkpoint = torch.load(path, map_location=run.device, weights_only=True)
    if not isinstance(checkpoint, dict) or set(CHECKPOINT_KEYS) - set(checkpoint):
        raise CheckpointError(f"{path} is not a train.py checkpoint (it has no {', '.join(CHECKPOINT_KEYS)}); {fix}")
    fixed, changed = resume_differences(checkpoint["config"], run.config)
    if fixed:
        raise ConfigError(f"--resume: {path} was trained with other settings ({'; '.join(fixed)}). They define the "
                          "model, the adapter or the training, so they must equal the checkpoint's: give its values, "
                          "or train afresh in another --out-dir")
    if changed:
        run.log(f"note: resuming with changed settings: {'; '.join(changed)}")
    return checkpoint


# -----------------------------------------------------------------------------
# 2. Model: the pretrained weights, then the adapter (tasks.adapt_model: which layers, how each method
#    adapts them), and what KaSA's truncation costs (tasks.report_truncation)


def load_model(run: Run, checkpoint: dict | None):
    """The pretrained model, the task, then the adapter: KaSA's SVD truncation happens here, on every
    rank (the SVD is deterministic, and DDP also broadcasts rank 0's weights), or, on --resume, the
    saved truncation and adapter are loaded instead (no SVD)."""
    config = run.config
    run.log(f"loading {config.model} ({str(run.base_dtype).removeprefix('torch.')}, {run.device})")
    with errors.users_files(CheckpointError, f"--model {config.model}: cannot load it"):
        model, tokenizer = load_pretrained(config.model, dtype=run.base_dtype, device=run.device)
    if config.max_len > model.config.max_position:
        raise ConfigError(f"--max-len {config.max_len}: {config.model} reads at most {model.config.max_position} tokens")
    with errors.users_files(errors.DataError, f"--task {config.task}: cannot load its data"):
        task = TASKS[config.task](config, model, tokenizer)
    fresh = checkpoint is None
    with contextlib.nullcontext() if fresh else errors.reading(run.checkpoint_path, CheckpointError,
                                                                "delete it, or point --out-dir elsewhere"):
        calibration = None  # layer inputs: the activation criterion ranks by them, the report shows both criteria
        if fresh and config.method == "kasa" and config.calibration_batches > 0 and (
                config.truncation_criterion == "activation" or config.truncation_report):
            calibration = calibration_statistics(model, task, config, run.device, run.amp_dtype)
        if fresh or config.method == "full":
            adapted = adapt_model(model, config, calibration)  # KaSA's step 1, the SVD truncation, happens in here
        else:
            adapted = kasa.load_kasa_state_dict(model, checkpoint["adapter"], dropout=config.adapter_dropout)
        if not fresh and config.method == "full":
            model.load_state_dict(checkpoint["model"])
        if not fresh and task.head is not None:
            task.head.load_state_dict(checkpoint["head"])
    if fresh and config.method == "kasa" and config.truncation_report and run.is_main:
        run.log(f"truncation report: the loss on {len(task.probe_batches)} training batches with each of the "
                f"{len(adapted)} layers truncated alone (--no-truncation-report skips it)")
        report_truncation(model, task.probe_batches, run.device, run.amp_dtype, run.out_dir, log=run.log,
                          calibration=calibration)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if task.head is not None:  # outside the model, so apply_kasa's freezing leaves it trainable
        trainable += list(task.head.parameters())
    run.log(f"{config.method} on {len(adapted)} layers (r={config.r}, α={config.alpha:g}): "
            f"{sum(p.numel() for p in trainable):,} trainable of {model.num_params():,} parameters"
            + (f"; {run.world} processes" if run.world > 1 else ""))
    return model, tokenizer, task, adapted, trainable


# -----------------------------------------------------------------------------
# 3. Data: each epoch's order is a function of (seed, epoch) alone, so a resumed run sees exactly the
#    batches an uninterrupted one would. A global batch of world × batch_size examples is dealt out
#    round-robin: rank i takes examples i, i + world, ...


@dataclass
class Schedule:
    examples: list                        # the training examples used
    global_batch: int                     # examples per micro-batch over all ranks
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int


def plan_data(run: Run, task: Task) -> Schedule:
    config = run.config
    examples = task.train_examples[:config.max_train_examples or None]
    if not examples:
        raise errors.DataError(f"--task {config.task}: the training split has no examples")
    global_batch = config.batch_size * run.world
    batches_per_epoch = math.ceil(len(examples) / global_batch)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = min(math.inf if config.max_steps is None else config.max_steps, steps_per_epoch * config.epochs)
    return Schedule(examples, global_batch, batches_per_epoch, steps_per_epoch, total_steps)


def epoch_batches(lengths: list, global_batch: int, seed: int, epoch: int, group_by_length: bool) -> list:
    """The global batches of one epoch (lists of example indices). With group_by_length: the shuffled
    order is cut into chunks of 50 batches, each chunk sorted by length (longest first), cut into
    batches, and the batches shuffled, so a batch holds examples of similar length (little padding)
    while the epoch still visits the data in a seeded random order."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        chunk = 50 * global_batch
        order = [i for start in range(0, len(order), chunk)
                 for i in sorted(order[start:start + chunk], key=lambda i: -lengths[i])]
    batches = [order[start:start + global_batch] for start in range(0, len(order), global_batch)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def micro_batches(run: Run, task: Task, schedule: Schedule, start: int):
    """Yields (epoch, this rank's batch, whether it holds examples) from micro-batch `start` on. The
    last global batch of an epoch may leave a rank without examples: it then computes on one borrowed
    example with weight zero, so that every rank still takes part in the gradient all-reduce."""
    config, examples = run.config, schedule.examples
    lengths = [task.length(example) for example in examples]
    epoch, first = divmod(start, schedule.batches_per_epoch)
    while True:
        batches = epoch_batches(lengths, schedule.global_batch, config.seed, epoch, config.group_by_length)
        for chunk in batches[first:]:
            mine = chunk[run.rank::run.world]
            yield epoch, task.collate([examples[i] for i in (mine or chunk[:1])]), len(mine) > 0
        epoch, first = epoch + 1, 0


# -----------------------------------------------------------------------------
# 4. Optimizer and schedule (linear warmup, then linear decay to zero); the plan, printed up front


@dataclass
class Training:
    """What a checkpoint holds besides the config: the trainable state and the progress so far."""
    model: nn.Module
    task: Task
    adapted: list                         # the adapted layer names (empty for full fine-tuning)
    trainable: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    step: int = 0
    history: list = field(default_factory=list)       # one dict per optimizer step (+ "validation": --eval-every)
    evaluations: list = field(default_factory=list)   # the dev scores after each epoch (tasks with select_by)
    saved_step: int = None                # the step of the last checkpoint this run wrote or resumed from


def make_training(run: Run, schedule: Schedule, model, task: Task, adapted: list, trainable: list,
                  checkpoint: dict | None) -> Training:
    config, total = run.config, schedule.total_steps
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    warmup = round(config.warmup_ratio * total) if config.warmup_ratio > 0 else config.warmup_steps
    if 0 < total <= warmup:
        run.log(f"note: the warmup ({warmup} steps) is not shorter than the run ({total} steps), so the learning "
                f"rate never reaches --lr {config.lr:g}; for short runs pass e.g. --warmup-steps {max(1, total // 10)}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / warmup if step < warmup
                                                  else max(0.0, (total - step) / max(1, total - warmup)))
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.amp_dtype == torch.float16)
    training = Training(model, task, adapted, trainable, optimizer, scheduler, scaler)
    if checkpoint is not None:
        with errors.reading(run.checkpoint_path, CheckpointError, "delete it, or point --out-dir elsewhere"):
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            scaler.load_state_dict(checkpoint["scaler"])
            torch.set_rng_state(checkpoint["rng"]["cpu"].cpu())
            if run.device_type == "cuda" and checkpoint["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(checkpoint["rng"]["cuda"].cpu())
        training.step = training.saved_step = checkpoint["step"]
        training.history, training.evaluations = checkpoint["history"], checkpoint.get("evaluations", [])
        run.log(f"resumed from {run.checkpoint_path} at step {training.step}")
    precision = "float32" if run.amp_dtype is None else f"{str(run.amp_dtype).removeprefix('torch.')} autocast"
    run.log(f"plan: {total:,} steps ({total / schedule.steps_per_epoch:.3g} epochs of {schedule.steps_per_epoch:,}) "
            f"over {len(schedule.examples):,} training examples, {config.batch_size} per batch × {config.grad_accum} "
            f"accumulated × {run.world} process{'es' if run.world > 1 else ''} = {config.batch_size * config.grad_accum * run.world} "
            f"per step; {run.device}, {precision}; {sum(p.numel() for p in trainable):,} trainable parameters"
            + (f"; validation every {config.eval_every} steps" if config.eval_every else "")
            + ("; then evaluation" if config.eval else ""))
    return training


def save_checkpoint(run: Run, t: Training):
    files.save_torch_atomic(dict(
        adapter=kasa.kasa_state_dict(t.model) if t.adapted else {},
        model=t.model.state_dict() if run.config.method == "full" else {},
        head=t.task.head.state_dict() if t.task.head is not None else {},
        optimizer=t.optimizer.state_dict(), scheduler=t.scheduler.state_dict(), scaler=t.scaler.state_dict(),
        rng={"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if run.device_type == "cuda" else None},
        step=t.step, history=t.history, evaluations=t.evaluations,
        config={**dataclasses.asdict(run.config), "resume": False}), run.checkpoint_path)
    t.saved_step = t.step


# -----------------------------------------------------------------------------
# 5. Train. One optimizer step averages the task loss over every loss unit (E2E: target token) of its
#    grad_accum micro-batches on all ranks, so it equals one big batch's loss however the batch is
#    split. DDP averages gradients over ranks, hence the factor world.


class TaskLoss(nn.Module):
    """The model, the task's head and its loss as one module: what DistributedDataParallel wraps, so
    that every trainable parameter (adapter and head) is reached through forward()."""

    def __init__(self, model: nn.Module, head: nn.Module | None, loss: Callable):
        super().__init__()
        self.model, self.head, self.loss = model, head, loss

    def forward(self, batch):
        return self.loss(self.model, batch)


def all_ranks_sum(run: Run, *values: float) -> list:
    if run.world == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=run.device)
    dist.all_reduce(total)
    return total.tolist()


def train(run: Run, t: Training, schedule: Schedule):
    config, model = run.config, t.model
    module = TaskLoss(model, t.task.head, t.task.loss)
    if run.world > 1:  # after the adapter exists, so every rank has the same truncated base and trainables
        module = DistributedDataParallel(module, device_ids=None if run.device == "cpu" else [run.device])
    regularize = bool(t.adapted) and (config.beta > 0 or config.gamma > 0)
    batches = micro_batches(run, t.task, schedule, start=t.step * config.grad_accum)
    model.train()
    tokens_seen, start_time, start_step = 0, time.time(), t.step
    while t.step < schedule.total_steps:
        # ----- BEGIN training step -----
        micro = [next(batches) for _ in range(config.grad_accum)]
        units = [t.task.loss_units(batch) if has_examples else 0 for _, batch, has_examples in micro]
        (step_units,) = all_ranks_sum(run, sum(units))
        task_loss_sum, step_tokens = 0.0, 0
        for i, ((epoch, batch, _), batch_units) in enumerate(zip(micro, units)):
            batch = {k: v.to(run.device) for k, v in batch.items()}
            last = i == config.grad_accum - 1  # DDP all-reduces the summed gradients after the last backward only
            with contextlib.nullcontext() if run.world == 1 or last else module.no_sync():
                with torch.autocast(run.device_type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                    task_loss = module(batch)
                l2, l3 = kasa.kasa_regularization(model) if regularize else (torch.zeros(()), torch.zeros(()))
                # Eq. 11 for the whole step: the task loss weighted by this batch's share of the step's
                # units, the regularizer once in total (1 / grad_accum per micro-batch).
                loss = (task_loss.float() * (batch_units * run.world / step_units)
                        + (config.beta * l2 + config.gamma * l3) / config.grad_accum)
                if not torch.isfinite(loss):
                    last_good = (f"the last good checkpoint is {run.checkpoint_path} (step {t.saved_step}; --resume "
                                 "continues from it)" if t.saved_step is not None else "no checkpoint was saved yet")
                    raise LossNotFinite(f"step {t.step}: the loss is {loss.item()} (task {task_loss.item()}, l2 "
                                        f"{l2.item()}, l3 {l3.item()}); {last_good}. Try a lower --lr, "
                                        "--grad-clip 1.0, or --dtype float32.")
                t.scaler.scale(loss).backward()
            task_loss_sum += task_loss.item() * batch_units / step_units
            step_tokens += int(batch["attention_mask"].sum())
        if config.grad_clip > 0:
            t.scaler.unscale_(t.optimizer)
            torch.nn.utils.clip_grad_norm_(t.trainable, config.grad_clip)
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.optimizer.zero_grad(set_to_none=True)
        t.scheduler.step()
        t.step += 1
        # ----- END training step -----
        step_loss, step_tokens = all_ranks_sum(run, task_loss_sum, step_tokens)
        tokens_seen += step_tokens
        t.history.append({"step": t.step, "epoch": epoch, "loss": step_loss, "l2": l2.item(), "l3": l3.item(),
                          "lr": t.scheduler.get_last_lr()[0]})
        done, elapsed = t.step - start_step, time.time() - start_time
        eta = str(datetime.timedelta(seconds=round(elapsed / done * (schedule.total_steps - t.step))))
        if done == 3 and t.step < schedule.total_steps:
            run.log(f"estimate from the first 3 steps: {elapsed / 3:.2f} s/step, so the {schedule.total_steps - t.step:,} "
                    f"steps left take about {eta} (refined at every log line; evaluation not included)")
        if t.step % config.log_every == 0 or t.step == schedule.total_steps:
            run.log(f"step {t.step}/{schedule.total_steps} | loss {step_loss:.4f} | l2 {l2.item():.3f} | l3 "
                    f"{l3.item():.3f} | lr {t.scheduler.get_last_lr()[0]:.2e} | {tokens_seen / elapsed:,.0f} tok/s "
                    f"| ETA {eta}")
        if run.is_main and config.eval and t.task.select_by and t.step % schedule.steps_per_epoch == 0 \
                and t.step < schedule.total_steps:
            model.eval()  # the last epoch is scored in step 6, on the merged model
            t.evaluations.append(score(run, t, schedule))
            model.train()
            run.log(f"dev after epoch {t.evaluations[-1]['epoch']:g}: {t.evaluations[-1]}")
        if run.is_main and config.eval_every and (t.step % config.eval_every == 0 or t.step == schedule.total_steps):
            validate(t.task, model, run.out_dir, t.history, run.log)  # in the history, so the checkpoint keeps it
        if run.is_main and (t.step % config.save_every == 0 or t.step == schedule.total_steps):
            save_checkpoint(run, t)


# -----------------------------------------------------------------------------
# 6. Evaluate: save the adapter, then merge ΔW into the weights (zero added latency), decode, score.


def score(run: Run, t: Training, schedule: Schedule) -> dict:
    """The task's metrics for the model as it is now, labelled with the epochs trained so far."""
    return {**t.task.evaluate(t.model, run.out_dir), "epoch": round(t.step / schedule.steps_per_epoch, 2)}


def save_outputs(run: Run, t: Training, tokenizer):
    out_dir = run.out_dir
    files.write_text_atomic(out_dir / "history.json", json.dumps(t.history, indent=1))
    if t.adapted:
        files.save_safetensors_atomic(kasa.kasa_state_dict(t.model), out_dir / "adapter.safetensors")
    if t.task.head is not None:
        files.save_safetensors_atomic(t.task.head.state_dict(), out_dir / "head.safetensors")
    print(f"trained {t.step} steps; checkpoint in {run.checkpoint_path}")
    if t.history:  # nothing to draw after --max-steps 0
        evaluation.write_plots(out_dir)
    if run.config.export:
        save_hf_checkpoint(t.model, tokenizer, out_dir / "export" / "hf")
        if t.adapted:
            save_peft_adapter(t.model, out_dir / "export" / "peft", base_model_name_or_path=run.config.model)
        print(f"exported to {out_dir / 'export'}: hf/ (merged, for transformers) "
              + ("and peft/ (a LoRA adapter for the original model)" if t.adapted else ""))


def evaluate(run: Run, t: Training, schedule: Schedule) -> dict:
    t.model.eval()
    if t.adapted:
        kasa.merge_kasa(t.model)
    metrics = final = score(run, t, schedule)
    if t.task.select_by:  # the final epoch and the best one, each with its epoch (the paper reports the best)
        best = max(t.evaluations + [final], key=lambda scores: scores[t.task.select_by])
        metrics = {**{f"final_{k}": v for k, v in final.items()}, **{f"best_{k}": v for k, v in best.items()}}
    metrics["train_steps"] = t.step
    files.write_text_atomic(run.out_dir / "metrics.json", json.dumps(metrics, indent=2))
    print("\n| metric | value |\n|---|---|")
    for name, value in metrics.items():
        print(f"| {name} | {value if not isinstance(value, float) else f'{value:.4f}'} |")
    print(f"\nmetrics: {run.out_dir / 'metrics.json'}")
    return metrics


def main(argv=None):
    config = parse_config(argv, description=__doc__)                      # 1. config
    run = start_run(config)
    checkpoint = load_checkpoint(run) if config.resume else None
    model, tokenizer, task, adapted, trainable = load_model(run, checkpoint)  # 2. model
    if run.is_main:
        files.write_text_atomic(run.out_dir / "config.json", json.dumps(dataclasses.asdict(config), indent=2))
    schedule = plan_data(run, task)                                        # 3. data
    training = make_training(run, schedule, model, task, adapted, trainable, checkpoint)  # 4. optimizer
    train(run, training, schedule)                                         # 5. train
    if run.world > 1:
        dist.destroy_process_group()
    if not run.is_main:
        return None
    save_outputs(run, training, tokenizer)                                 # 6. evaluate
    return evaluate(run, training, schedule) if config.eval else None


if __name__ == "__main__":
    errors.run_cli(main)
