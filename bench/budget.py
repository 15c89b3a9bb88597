"""Does KaSA catch up? Learning curves on SmolLM2-135M at the paper's E2E recipe and a longer SST-2
budget: validation scores every ~250 steps (train.py --eval-every), one curve per method and seed.

E2E, the paper's recipe on the data we have: there is no train split offline, so every run trains
on the dev set with 50 dev MRs held out for validation (train.py --val-mrs 50: the same seeded MRs
for every run, none of their references trained on), 5 epochs at batch 8 (4,672 dev rows minus
the held-out MRs' 373 rows: 2,690 steps; all 4,672 rows would be 2,920), lr 2e-4, 500
warmup steps then linear decay, label smoothing 0.1, weight decay 0.01, r=4, α=32, adapter dropout
0.1 on q,v. Validation: greedy decoding of the held-out MRs (BLEU, NIST, ROUGE_L, CIDEr) and the
teacher-forced loss on their references. At the end: the five metrics on the first 50 test MRs
with beam 4 (as bench/compare.py). Methods: KaSA, LoRA, PiSSA, KaSA --truncation 0, and KaSA with
the data-aware truncation (--truncation-criterion activation).
SST-2: KaSA, LoRA, PiSSA, 2,000 steps × batch 8 (one epoch over the first 16,000 training rows),
the preset otherwise (lr 5e-4, 6% warmup, r=8, α=16), accuracy on the whole dev set (872 rows)
every 250 steps. Seeds 0,1,2 for KaSA and LoRA, seed 0 for the others. LoRA and PiSSA train
without KaSA's regularizers (--beta 0 --gamma 0), as in bench/compare.py.

Order: the most informative first: seed 0 of KaSA and LoRA on SST-2 (the short runs) and on E2E,
then seed 0 of the other methods, then seeds 1 and 2. The final test score is the last step's:
validation never picks a checkpoint.

Resuming: the runs are bench/sweep.py's (one train.py process each, RESULTS_DIR/runs.jsonl). A run
checkpoints at every validation (--save-every = --eval-every) into its directory
RESULTS_DIR/runs/<name>-<key>/ (git-ignored; its checkpoint.pt is deleted when the run finishes),
and an interrupted sweep continues with the same command, the running run from its last
checkpoint (train.py --resume):

    nohup python bench/budget.py > ~/budget.log 2>&1 &     # start, or continue, the sweep
    python bench/budget.py --dry-run                        # the runs still to do, and the time they take
    python bench/budget.py --report-only                    # budget.md and budget.png from what exists now

The report (RESULTS_DIR/budget.md, budget.png) also reads the curve so far of a run still under
way (or interrupted) from its history.json, which train.py rewrites at every validation; such
points are marked partial. It gives each method's validation curve (mean ± sample std over seeds
at each step), the first step at which KaSA's mean comes within LoRA's seed spread (KaSA mean ≥
LoRA mean − LoRA std, at a step with at least two LoRA seeds), and the final test scores.
"""
import json
import math
import re
import statistics
from pathlib import Path

import sweep
from sweep import Run

import data
import errors
import files
import tasks
import train

EVAL_EVERY, VAL_MRS, E2E_EPOCHS = 250, 50, 5
E2E_RECIPE = ["--epochs", str(E2E_EPOCHS), "--lr", "2e-4", "--warmup-steps", "500", "--label-smoothing", "0.1",
              "--weight-decay", "0.01", "--alpha", "32", "--adapter-dropout", "0.1"]
HEADLINE = {"e2e": "BLEU", "sst2": "accuracy"}   # the validation score the curves and the verdict use
# Seconds per training step and per validation on 2 free CPU cores (bench/sweep.py's measurements:
# E2E 2.1 s per step at batch 8; SST-2 ~0.8 s per step at max length 128), for --dry-run's estimate.
SECONDS = {"e2e": dict(step=2.1, validation=40, start=60, test=30), "sst2": dict(step=0.8, validation=25, start=60, test=0)}
LOADED = 2.5   # a typical slowdown with other jobs on the same 2 cores (bench/sweep.py); --dry-run also
#                measures the current one from the log of a run under way


def methods(task: str) -> list:
    """(label, --method, extra flags, seeds) per method; KaSA and LoRA get every seed."""
    if task == "sst2":
        return [("KaSA", "kasa", [], "all"), ("LoRA", "lora", [], "all"), ("PiSSA", "pissa", [], "first")]
    return [("KaSA", "kasa", [], "all"), ("LoRA", "lora", [], "all"), ("PiSSA", "pissa", [], "first"),
            ("KaSA, no truncation", "kasa", ["--truncation", "0"], "first"),
            ("KaSA, activation truncation", "kasa", ["--truncation-criterion", "activation"], "first")]


def task_flags(task: str, budget: sweep.Budget) -> list:
    """train.py flags of one run on this budget (without --method, --r, --seed)."""
    sweep.task_flags(task, budget)  # its checks: the model and the data are there
    common = ["--task", task, "--model", budget.model, "--batch-size", str(budget.batch_size), "--log-every", "10",
              "--no-truncation-report", "--eval-every", str(EVAL_EVERY), "--save-every", str(EVAL_EVERY)]
    if task == "e2e":
        steps = ["--max-steps", str(budget.e2e_steps)] if budget.e2e_steps else []
        return common + ["--data-dir", budget.e2e_data, *E2E_RECIPE, *steps, "--val-mrs", str(VAL_MRS),
                         "--max-eval-examples", str(budget.eval_mrs), "--num-beams", str(budget.num_beams)]
    return common + ["--data-dir", budget.glue_data, "--max-steps", str(budget.glue_steps),
                     "--max-train-examples", str(budget.glue_steps * budget.batch_size),
                     "--max-eval-examples", str(budget.dev_rows), "--max-len", str(budget.max_len)]


def build_runs(task_list: list, seeds: list, budget: sweep.Budget) -> list:
    """Every run, the most informative first: seed 0 of KaSA and LoRA (SST-2, then E2E), then seed 0
    of the other methods, then the remaining seeds of KaSA and LoRA."""
    def run(task, label, method, extra, seed):
        plain = ["--beta", "0", "--gamma", "0"] if method in ("lora", "pissa") else []
        flags = task_flags(task, budget) + ["--method", method, "--r", str(sweep.preset_rank(task)), *plain,
                                            *extra, "--seed", str(seed)]
        name = f"budget-{task}-{label.lower().replace(', ', '-').replace(' ', '-')}-s{seed}"
        return Run(name, flags, {"task": task, "method": label, "seed": seed})
    ordered = [t for t in ("sst2", "e2e") if t in task_list]
    first = [run(t, *m[:3], seeds[0]) for t in ordered for m in methods(t)[:2]]
    others = [run(t, *m[:3], seeds[0]) for t in ordered for m in methods(t)[2:]]
    rest = [run(t, *m[:3], seed) for seed in seeds[1:] for t in ordered for m in methods(t) if m[3] == "all"]
    return first + others + rest


def planned_steps(task: str, budget: sweep.Budget) -> int:
    """The optimizer steps of one run: E2E's 5 epochs over the dev rows left after the hold-out."""
    if task != "e2e":
        return budget.glue_steps
    dev = data.resolve_e2e_files("original", budget.e2e_data)["dev"]
    kept, _ = tasks.hold_out_mrs(data.load_e2e_split(dev), VAL_MRS)
    epoch = math.ceil(len(kept) / budget.batch_size)
    return min(budget.e2e_steps or math.inf, E2E_EPOCHS * epoch)


def estimate_seconds(task: str, steps: int) -> float:
    """One run's time on 2 free CPU cores: training, the validations, loading and the test decoding."""
    cost = SECONDS[task]
    return cost["start"] + steps * cost["step"] + math.ceil(steps / EVAL_EVERY) * cost["validation"] + cost["test"]


# -----------------------------------------------------------------------------
# Curves: the validation points of finished runs (in runs.jsonl) and of runs under way (history.json)


def run_dir(results_dir, run: Run) -> Path:
    return Path(results_dir) / "runs" / f"{run.name}-{run.key}"


def validation_points(history: list) -> list:
    """[{"step": s, **scores}] of a train.py history (the entries --eval-every filled in)."""
    return [{"step": entry["step"], **entry["validation"]} for entry in history if "validation" in entry]


def with_validation(runner=sweep.run_train):
    """A sweep runner that also stores the run's validation curve in its runs.jsonl record, so the
    committed results hold the curves (run directories are not committed)."""
    def run(command, out_dir):
        metrics = runner(command, out_dir)
        history = json.loads((Path(out_dir) / "history.json").read_text())
        return {**metrics, "validation": validation_points(history)}
    return run


def curve(run: Run, results: dict, results_dir) -> tuple[list, bool]:
    """(validation points, finished) of one run: from runs.jsonl when it finished, else the partial
    curve of its history.json (a run under way or interrupted); ([], False) before its first point."""
    if run.key in results:
        return results[run.key]["metrics"].get("validation", []), True
    path = run_dir(results_dir, run) / "history.json"
    try:
        return validation_points(json.loads(path.read_text())), False
    except (OSError, ValueError):  # not started, or a file being replaced: no points yet
        return [], False


def aggregate(runs: list, results: dict, results_dir, task: str) -> dict:
    """method -> {step: [values over seeds]} of the task's headline score, and the partial runs' names."""
    curves, partial = {}, []
    for run in runs:
        if run.labels["task"] != task:
            continue
        points, finished = curve(run, results, results_dir)
        by_step = curves.setdefault(run.labels["method"], {})
        for point in points:
            if point.get(HEADLINE[task]) is not None:
                by_step.setdefault(point["step"], []).append(point[HEADLINE[task]])
        progress = None if finished else measured_rate(run_dir(results_dir, run) / "log.txt")
        if points and not finished:
            partial.append(f"{run.name} (to step {points[-1]['step']})")
        elif progress is not None:
            partial.append(f"{run.name} (at step {progress[0]:,}, before its first validation point)")
    return curves, partial


def catch_up_step(kasa: dict, lora: dict):
    """The first step where KaSA's mean is within LoRA's seed spread (≥ LoRA mean − LoRA sample std),
    among the steps with at least two LoRA values and one KaSA value; None if there is none."""
    for step in sorted(set(kasa) & set(lora)):
        if len(lora[step]) >= 2 and statistics.mean(kasa[step]) >= statistics.mean(lora[step]) - statistics.stdev(lora[step]):
            return step
    return None


def curve_table(curves: dict) -> str:
    methods_ = list(curves)
    lines = ["| step | " + " | ".join(methods_) + " |", "|" + "---|" * (len(methods_) + 1)]
    for step in sorted({s for by_step in curves.values() for s in by_step}):
        cells = []
        for method in methods_:
            values = curves[method].get(step, [])
            cells.append(sweep.format_cell(sweep.mean_std(values), 4) + (f" ({len(values)})" if values else ""))
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    if len(lines) == 2:
        lines.append("| (no validation point yet) |" + " |" * len(methods_))
    return "\n".join(lines)


def verdict(curves: dict) -> str:
    if "KaSA" not in curves or "LoRA" not in curves:
        return "KaSA vs LoRA: no curves of both yet."
    step = catch_up_step(curves["KaSA"], curves["LoRA"])
    lora_steps = [s for s, values in curves["LoRA"].items() if len(values) >= 2]
    if step is not None:
        return f"KaSA comes within LoRA's seed spread (mean ≥ LoRA mean − std) first at step {step}."
    if not lora_steps:
        return "KaSA vs LoRA: not decided yet (the seed spread needs at least two LoRA seeds at a step)."
    return f"KaSA does not come within LoRA's seed spread at any step measured with ≥ 2 LoRA seeds (up to {max(lora_steps)})."


def plot_curves(panels: list, path) -> bool:
    """One panel per (title, curves, metric): mean over seeds against the step, the band ± one std."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    figure = Figure(figsize=(6 * len(panels), 4.2), layout="constrained")
    for axes, (title, curves, metric) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for method, by_step in curves.items():
            steps = sorted(by_step)
            if not steps:
                continue
            means = [statistics.mean(by_step[s]) for s in steps]
            stds = [statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps]
            seeds = max(len(v) for v in by_step.values())
            line, = axes.plot(steps, means, "o-", ms=3, label=f"{method} ({seeds} seed{'s' * (seeds > 1)})")
            axes.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                              color=line.get_color(), alpha=0.2)
        axes.set(title=title, xlabel="optimizer step", ylabel=f"validation {metric}")
        axes.title.set_fontsize(8)
        axes.legend(fontsize=8)
    files.write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=120))
    print(f"wrote {path}")
    return True


def describe(task: str, budget: sweep.Budget) -> str:
    model = Path(budget.model).name
    if task == "e2e":
        steps = f"{budget.e2e_steps} steps" if budget.e2e_steps else f"{E2E_EPOCHS} epochs"
        return (f"{model}, the paper's recipe: {steps} × batch {budget.batch_size} on the dev set minus {VAL_MRS} "
                f"held-out MRs, lr 2e-4, 500 warmup steps, label smoothing 0.1, r=4, α=32, dropout 0.1; "
                f"validation: greedy BLEU on the {VAL_MRS} held-out dev MRs every {EVAL_EVERY} steps; "
                f"test: first {budget.eval_mrs} test MRs, beam {budget.num_beams}")
    return (f"{model}, {budget.glue_steps} steps × batch {budget.batch_size} (one epoch over the first "
            f"{budget.glue_steps * budget.batch_size} train rows), the sst2 preset (lr 5e-4, 6% warmup, r=8, α=16); "
            f"validation: accuracy on the first {budget.dev_rows} dev rows every {EVAL_EVERY} steps")


def report(runs: list, results: dict, results_dir, task_list: list, budget: sweep.Budget, argv, seeds: str) -> str:
    lines = sweep.report_header("Does KaSA catch up? Validation curves at the paper's recipe", "budget.py", argv,
                                seeds, results_dir, " Curve cells: mean ± std over seeds (seeds in).")
    panels = []
    for task in (t for t in ("sst2", "e2e") if t in task_list):
        curves, partial = aggregate(runs, results, results_dir, task)
        title = describe(task, budget)
        panels.append((f"{task}: {title}", curves, HEADLINE[task]))
        metrics = sweep.task_metrics(task)
        rows = sweep.summarize([r for r in runs if r.labels["task"] == task], results, metrics)
        lines += [f"## {task}: {title}\n", f"Validation {HEADLINE[task]} against the optimizer step:\n",
                  curve_table(curves), "", verdict(curves), ""]
        if partial:
            lines += ["Partial curves (runs under way or interrupted, from their history.json and log.txt): "
                      + ", ".join(partial) + ".", ""]
        lines += [f"Final scores ({'test MRs' if task == 'e2e' else 'dev rows'}, the last step's model):\n",
                  sweep.markdown_table(rows, ["method", *metrics, "runs", "min/run"]), ""]
    plot_curves(panels, Path(results_dir) / "budget.png")
    return "\n".join(lines)


PROGRESS = re.compile(r"^step (\d+)/(\d+) \|.*\| ETA (?:(\d+) days?, )?(\d+):(\d\d):(\d\d)$")


def measured_rate(log_path: Path):
    """(step, seconds per step) of a run under way, from the last progress line of its log.txt
    (train.py's ETA over the steps left), or None before its first one."""
    try:
        lines = log_path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        match = PROGRESS.match(line.strip())
        if match and int(match[1]) < int(match[2]):
            step, total, days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
            return step, (((days * 24 + hours) * 60 + minutes) * 60 + seconds) / (total - step)
    return None


def print_plan(runs: list, results: dict, budget: sweep.Budget, results_dir):
    """--dry-run: the runs still to do, each with its steps and estimated time, and the total; with
    a run under way, the total again at the rate that run measures now (the machine's load)."""
    steps = {task: planned_steps(task, budget) for task in {run.labels["task"] for run in runs}}
    todo = [run for run in dict((run.key, run) for run in runs).values() if run.key not in results]
    total = 0.0
    for run in todo:
        task = run.labels["task"]
        seconds = estimate_seconds(task, steps[task])
        total += seconds
        print(f"  {run.name}: {steps[task]:,} steps, ~{seconds / 3600:.1f} h")
    print(f"estimate: {total / 3600:.1f} h on 2 free CPU cores for the {len(todo)} runs left (E2E "
          f"{SECONDS['e2e']['step']} s/step, SST-2 {SECONDS['sst2']['step']} s/step), about "
          f"{LOADED * total / 3600:.0f} h with other jobs on the same cores; a run in progress resumes from its checkpoint")
    for run in todo:
        rate = measured_rate(run_dir(results_dir, run) / "log.txt")
        if rate is not None:
            slowdown = rate[1] / SECONDS[run.labels["task"]]["step"]
            print(f"measured now: {run.name} at step {rate[0]:,}, {rate[1]:.1f} s/step ({slowdown:.1f}x the free-core "
                  f"rate): at that load the runs left take about {slowdown * total / 3600:.0f} h")


def main(argv=None, runner=sweep.run_train):
    parser = sweep.sweep_arg_parser(__doc__)
    parser.add_argument("--tasks", default="e2e,sst2", help="comma-separated: e2e and/or sst2 (default: %(default)s)")
    # budget.py's own defaults: E2E runs the recipe's epochs (--e2e-steps N > 0 caps it, for a quick
    # try); SST-2 runs 2,000 steps and scores the whole dev set.
    parser.set_defaults(e2e_steps=0, glue_steps=2000, dev_rows=872)
    args = parser.parse_args(argv)
    budget, seed_list, task_list = sweep.budget_from_args(args), sweep.seeds_from_args(args), args.tasks.split(",")
    if set(task_list) - set(HEADLINE):
        raise errors.ConfigError(f"--tasks {args.tasks}: budget.py runs e2e and sst2 only")
    runs = build_runs(task_list, seed_list, budget)
    results = sweep.run_sweep(runs, args.results_dir, runner=with_validation(runner), dry_run=args.dry_run,
                              report_only=args.report_only)
    if args.dry_run:
        print_plan(runs, results, budget, args.results_dir)
        return
    text = report(runs, results, args.results_dir, task_list, budget, argv, args.seeds)
    print("\n" + text)
    sweep.write_report(Path(args.results_dir) / "budget.md", text)


if __name__ == "__main__":
    errors.run_cli(main)
