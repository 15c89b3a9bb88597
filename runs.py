"""A train.py run directory: its files, its settings and precision, and its merged model.

eval.py's `--checkpoint` reads a run through these (and re-exports them); a reader of the
tutorial path may skip this file.
"""
import json
from pathlib import Path

import torch

from errors import CheckpointError, ConfigError, reading
from files import write_text_atomic


def setting(config, name: str):
    """One setting of a run: `config` is train.py's TrainConfig or the dict of its config.json."""
    return config[name] if isinstance(config, dict) else getattr(config, name)


def run_precision(dtype: str, device_type: str, method: str = "kasa") -> tuple:
    """(autocast dtype or None, dtype of the frozen base weights) of a run's --dtype on a device, as
    train.py trains: auto is bf16 autocast on CUDA (fp16 where the GPU lacks bf16) and float32 on
    the CPU. The frozen base is stored in the autocast dtype (half the memory, and no re-cast of
    every weight at every call) on CUDA, and with --dtype bfloat16 on the CPU too (measured there:
    a training step 0.63x and greedy decoding 0.8x the float32 time; bench/bench_model.py); full
    fine-tuning trains the weights themselves, which stay float32."""
    if dtype == "auto":
        bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
        amp_dtype = (torch.bfloat16 if bf16 else torch.float16) if device_type == "cuda" else None
    elif dtype in ("float32", "bfloat16", "float16"):
        amp_dtype = None if dtype == "float32" else getattr(torch, dtype)
    else:
        raise ConfigError(f"dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    low_precision_base = amp_dtype is not None and method != "full" and (
        device_type == "cuda" or amp_dtype == torch.bfloat16)
    return amp_dtype, amp_dtype if low_precision_base else torch.float32


RUN_FILES = ("config.json", "history.json", "adapter.safetensors", "truncation_report.json")
RUN_FIX = "is it the --out-dir of a finished train.py run? train again to rewrite it"
RUN_SETTINGS = ("task", "model", "method", "dtype", "data_version", "data_dir", "max_eval_examples",
                "num_beams", "max_new_tokens", "length_penalty", "no_repeat_ngram_size", "eval_batch_size")


def check_run_dir(run_dir) -> Path:
    """RUN_DIR as a Path, if it is a directory that a train.py run wrote (it holds one of RUN_FILES)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory; {RUN_FIX}" if run_dir.exists()
                              else f"{run_dir} does not exist; give the --out-dir of a train.py run")
    if not any((run_dir / name).is_file() for name in RUN_FILES):
        raise CheckpointError(f"{run_dir} is not a run directory: it holds none of {', '.join(RUN_FILES)}; "
                              "give the --out-dir of a train.py run")
    return run_dir


def read_run_config(run_dir: Path) -> dict:
    """RUN_DIR/config.json, checked to hold the settings the evaluation needs."""
    with reading(run_dir / "config.json", CheckpointError, RUN_FIX):
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    missing = [name for name in RUN_SETTINGS if not isinstance(config, dict) or name not in config]
    if missing:
        raise CheckpointError(f"{run_dir / 'config.json'} lacks the settings {missing}; {RUN_FIX}")
    return config


def load_run(run_dir, device="cpu", task: str | None = None):
    """(model, tokenizer, config dict) of a finished training run: the pretrained model named in
    RUN_DIR/config.json, in the precision the run trained in, with RUN_DIR/adapter.safetensors
    loaded and merged (no SVD is run); full fine-tuning: the weights of RUN_DIR/checkpoint.pt.
    task: the run must be of that task (checked before any model is loaded)."""
    from safetensors.torch import load_file

    import kasa
    from model import load_pretrained
    run_dir = check_run_dir(run_dir)
    config = read_run_config(run_dir)
    if task is not None and config["task"] != task:
        raise ConfigError(f"{run_dir} is a {config['task']!r} run, not {task!r}: eval.py --checkpoint decodes "
                          "E2E runs (a GLUE run's dev scores are in its metrics.json)")
    _, base_dtype = run_precision(config["dtype"], torch.device(device).type, config["method"])
    try:
        model, tokenizer = load_pretrained(config["model"], dtype=base_dtype, device=device)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load the run's model {config['model']!r} (config.json's 'model'): {e}") from e
    if config["method"] == "full":
        with reading(run_dir / "checkpoint.pt", CheckpointError, RUN_FIX):
            model.load_state_dict(torch.load(run_dir / "checkpoint.pt", map_location=device, weights_only=True)["model"])
        return model.eval(), tokenizer, config
    with reading(run_dir / "adapter.safetensors", CheckpointError, RUN_FIX):
        adapter = load_file(run_dir / "adapter.safetensors", device=str(device))
    try:
        kasa.load_kasa_state_dict(model, adapter)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{run_dir / 'adapter.safetensors'} does not fit the run's model "
                              f"{config['model']!r}: {e}") from e
    kasa.merge_kasa(model)
    return model.eval(), tokenizer, config


def update_run_metrics(run_dir: Path, metrics: dict) -> Path:
    """Write `metrics` into RUN_DIR/metrics.json, replacing those entries; the others (e.g. train_steps) stay."""
    path, previous = run_dir / "metrics.json", {}
    if path.is_file():
        with reading(path, CheckpointError, RUN_FIX):
            previous = json.loads(path.read_text(encoding="utf-8"))
    return write_text_atomic(path, json.dumps({**previous, **metrics}, indent=2))
