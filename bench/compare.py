"""Every method side by side on SmolLM2-135M: KaSA, LoRA, PiSSA, MiLoRA and full fine-tuning, on
E2E (trained on a subset of the dev set, scored on the first test MRs) and on SST-2 (a subset of
the training rows, the first dev rows), each over several seeds, next to a baseline with no
training: on E2E the untuned model (train.py --method lora --max-steps 0: the adapter is a zero
update), on GLUE the majority class of the training rows.

Every run is train.py with the task's preset (E2E: r=4, α=32 on q,v, lr 2e-4; SST-2: r=8, α=16,
lr 5e-4) and the shared budget of bench/sweep.py; all methods see the same rows for the same
number of steps, and are scored on the same test MRs / dev rows. LoRA, PiSSA and MiLoRA train
without KaSA's regularizers (--beta 0 --gamma 0), as in their papers. Full fine-tuning trains at
--full-lr (default 2e-5): the adapters' learning rates are ~10-25x what full fine-tuning of a
model this size usually takes. Budget per run: E2E 100 steps × batch 8, 50 test MRs, beam 4;
SST-2 100 steps × batch 8 (800 train rows), 400 dev rows. On 2 free CPU cores an E2E run takes
4-6 min and an SST-2 run 2-3 min, so the default sweep (2 tasks × 5 methods × 3 seeds + the E2E
base) takes about 1 h 45 min. Results (mean ± sample std over seeds) go to
RESULTS_DIR/compare.md; an interrupted sweep resumes where it stopped when started again (seed 0
of every run comes first).

    python bench/compare.py                                   # e2e and sst2, all methods, seeds 0,1,2
    python bench/compare.py --tasks sst2 --methods kasa,lora --seeds 0
    python bench/compare.py --dry-run                         # the commands still to run
    python bench/compare.py --report-only                     # the tables of the runs finished so far
"""
import dataclasses
from collections import Counter

import sweep
from sweep import Run

import errors

import data
import eval as evaluation


def majority_row(task: str, budget: sweep.Budget) -> dict:
    """The GLUE baseline: predict the most frequent label of the training rows for every dev row."""
    paths = data.resolve_glue_files(task, budget.glue_data)
    train_rows = budget.glue_steps * budget.batch_size
    train_labels = [ex.label for ex in data.load_glue_split(task, paths["train"])[:train_rows]]
    dev_labels = [ex.label for ex in data.load_glue_split(task, paths["dev"])[:budget.dev_rows]]
    majority = Counter(train_labels).most_common(1)[0][0]
    scores = evaluation.glue_metrics(task, [majority] * len(dev_labels), dev_labels)
    return {"method": "majority class", "runs": "—", **{f"final_{k}": (v, None) for k, v in scores.items()}}


def build_runs(tasks: list, methods: list, seeds: list, budget: sweep.Budget, full_lr: float) -> list:
    runs = []
    if "e2e" in tasks:  # decoding is deterministic and the adapter is zero: one run, whatever the seed
        no_training = sweep.run_flags("e2e", dataclasses.replace(budget, e2e_steps=0), "lora")
        runs.append(Run("e2e-base", no_training, {"task": "e2e", "method": "base (untuned)"}))
    for seed in seeds:  # seed-major: an interrupted sweep already has one seed of everything
        for task in tasks:
            for method in methods:
                extra = ["--lr", str(full_lr)] if method == "full" else []
                runs.append(Run(f"{task}-{method}-s{seed}", sweep.run_flags(task, budget, method, seed, extra=extra),
                                {"task": task, "method": method, "seed": seed}))
    return runs


def main(argv=None, name="compare", title="Every method side by side on SmolLM2", doc=__doc__,
         tasks="e2e,sst2", methods="kasa,lora,pissa,milora,full", seeds="0,1,2"):
    """Shared by the presets e2e_quality.py and glue_quality.py, which only change these defaults."""
    parser = sweep.sweep_arg_parser(doc, seeds)
    parser.add_argument("--tasks", default=tasks, help="comma-separated: e2e and/or GLUE tasks (sst2, rte, ...)")
    parser.add_argument("--methods", default=methods, help="comma-separated train.py --method values")
    parser.add_argument("--full-lr", type=float, default=2e-5, help="the learning rate of --method full")
    args = parser.parse_args(argv)
    budget, task_list, seed_list = sweep.budget_from_args(args), args.tasks.split(","), sweep.seeds_from_args(args)
    runs = build_runs(task_list, args.methods.split(","), seed_list, budget, args.full_lr)
    results = sweep.run_sweep(runs, args.results_dir, dry_run=args.dry_run, report_only=args.report_only)
    if args.dry_run:
        return

    full_lr_note = f" Full fine-tuning at lr {args.full_lr:g}." if "full" in args.methods.split(",") else ""
    report = sweep.report_header(title, f"{name}.py", argv, args.seeds, args.results_dir, full_lr_note)
    for task in task_list:
        metrics = sweep.task_metrics(task)
        rows = sweep.summarize([run for run in runs if run.labels["task"] == task], results, metrics)
        if task != "e2e":
            rows.insert(0, majority_row(task, budget))
        report += [f"## {task}: {sweep.describe_budget(task, budget)}\n",
                   sweep.markdown_table(rows, ["method", *metrics, "runs", "min/run"]), ""]
    text = "\n".join(report)
    print("\n" + text)
    sweep.write_report(f"{args.results_dir}/{name}.md", text)


if __name__ == "__main__":
    errors.run_cli(main)
