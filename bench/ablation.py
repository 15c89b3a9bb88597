"""The paper's ablation, on SmolLM2-135M, on E2E and SST-2, over seeds. Three studies:

1. components, added one at a time at the task's preset rank (E2E r=4, SST-2 r=8): LoRA (plain:
   LoRA, PiSSA and MiLoRA always train with --beta 0 --gamma 0 here);
   + SVD truncation (--method kasa --no-learn-sigma --beta 0 --gamma 0); + learned σ (--beta 0
   --gamma 0); + L2 (--gamma 0); + L3 = KaSA.
2. rank: r = 1, 4, 8, 16 for KaSA, LoRA, PiSSA and MiLoRA. α stays at the preset (E2E 32,
   SST-2 16), so the scale α/r falls as r grows, as in LoRA's rank study.
3. variants at r=8, next to LoRA and KaSA at r=8: truncation smaller than r (--truncation 1);
   truncation only where it is harmless: on this model, truncating v_proj raises the loss by more
   than a nat before training (train.py's truncation report) while q_proj costs nothing, so KaSA
   truncates q_proj and adapts v_proj without truncating it (--untruncated-targets v_proj); and
   no truncation at all (--truncation 0: learned σ and both regularizers only); and step 1 with a
   data-aware criterion that is not the paper's (--truncation-criterion activation: drop the r
   triplets adding the least output energy on 4 training batches, kasa.truncate_by_output_energy).

Budget per run (bench/sweep.py's): E2E 100 steps × batch 8 on the dev set, the first 50 test MRs,
beam 4; SST-2 100 steps × batch 8 (800 train rows), the first 400 dev rows; on 2 free CPU cores
4.5-10 min per E2E run and 1.7-3 min per SST-2 run (three days' measurements on the same machine
type). Runs shared between studies (LoRA and KaSA at the preset rank and at r=8) run once: 22 runs
per task and seed, 132 for the default (7-14 hours; the rank study's runs at the preset rank are
bench/compare.py's, which then already ran them). The order puts the most informative first and
seed 0 of everything before seeds 1 and 2: components, then variants, then ranks, the two tasks
interleaved, so an interrupted sweep (start it again to resume) has whole tables for one seed
early. Writes RESULTS_DIR/ablation.md (mean ± sample std over seeds) and ablation.png (the headline
metric against r, one line per method).

    python bench/ablation.py                                   # everything, seeds 0,1,2
    python bench/ablation.py --studies components --tasks sst2 --seeds 0
    python bench/ablation.py --dry-run                         # the commands still to run
    python bench/ablation.py --report-only                     # the tables of the runs finished so far
"""

import sweep
from sweep import Run

import errors


COMPONENTS = [  # (row, method, flags): each row adds one KaSA component to the row above it
    ("LoRA", "lora", []),
    ("+ SVD truncation", "kasa", ["--no-learn-sigma", "--beta", "0", "--gamma", "0"]),
    ("+ learned σ", "kasa", ["--beta", "0", "--gamma", "0"]),
    ("+ L2 (β)", "kasa", ["--gamma", "0"]),
    ("+ L3 (γ) = KaSA", "kasa", []),
]
VARIANT_R = 8
VARIANTS = [
    ("LoRA", "lora", []),
    ("KaSA (truncation r)", "kasa", []),
    ("KaSA, truncation 1", "kasa", ["--truncation", "1"]),
    ("KaSA, v_proj untruncated", "kasa", ["--untruncated-targets", "v_proj"]),
    ("KaSA, no truncation", "kasa", ["--truncation", "0"]),
    ("KaSA, activation criterion", "kasa", ["--truncation-criterion", "activation", "--calibration-batches", "4"]),
]
RANKS = (1, 4, 8, 16)
RANK_METHODS = ("kasa", "lora", "pissa", "milora")
STUDIES = ("components", "variants", "rank")


def planned(task: str, studies: list) -> list:
    """(study, labels, method, r, extra flags) for one task and seed, the most informative first."""
    preset_r = sweep.preset_rank(task)
    plan = {
        "components": [("components", {"row": row}, method, preset_r, extra) for row, method, extra in COMPONENTS],
        "variants": [("variants", {"row": row}, method, VARIANT_R, extra) for row, method, extra in VARIANTS],
        "rank": [("rank", {"method": method, "r": r}, method, r, []) for r in RANKS for method in RANK_METHODS],
    }
    return [spec for study in STUDIES if study in studies for spec in plan[study]]


def build_runs(tasks: list, seeds: list, studies: list, budget: sweep.Budget) -> list:
    runs = []
    for seed in seeds:
        for specs in zip(*(planned(task, studies) for task in tasks)):  # the tasks interleaved, spec by spec
            for task, (study, labels, method, r, extra) in zip(tasks, specs):
                flags = sweep.run_flags(task, budget, method, seed, r, extra)
                name = "-".join([task, method, f"r{r}", *(flag.lstrip("-") for flag in extra), f"s{seed}"])
                runs.append(Run(name, flags, {"study": study, "task": task, **labels, "seed": seed}))
    return runs


def rank_table(rows: list, metric: str) -> str:
    """r down, methods across: the metric's mean ± std, and the row's runs (finished/planned, all
    methods together: rows can differ, since the preset rank's runs may already have all seeds)."""
    wide, counts = {}, {}
    for row in rows:
        wide.setdefault(row["r"], {"r": row["r"]})[row["method"]] = row[metric]
        done, planned = map(int, row["runs"].split("/"))
        total = counts.get(row["r"], (0, 0))
        counts[row["r"]] = (total[0] + done, total[1] + planned)
    for r, (done, planned) in counts.items():
        wide[r]["runs"] = f"{done}/{planned}"
    return sweep.markdown_table(list(wide.values()), ["r", *RANK_METHODS, "runs"])


def main(argv=None):
    parser = sweep.sweep_arg_parser(__doc__)
    parser.add_argument("--tasks", default="e2e,sst2", help="comma-separated: e2e and/or GLUE tasks")
    parser.add_argument("--studies", default=",".join(STUDIES), help="comma-separated: " + ", ".join(STUDIES))
    args = parser.parse_args(argv)
    budget, tasks, studies = sweep.budget_from_args(args), args.tasks.split(","), args.studies.split(",")
    if unknown := set(studies) - set(STUDIES):
        parser.error(f"unknown studies {sorted(unknown)}; choose from {list(STUDIES)}")
    runs = build_runs(tasks, sweep.seeds_from_args(args), studies, budget)
    results = sweep.run_sweep(runs, args.results_dir, dry_run=args.dry_run, report_only=args.report_only)
    if args.dry_run:
        return

    report = sweep.report_header("KaSA ablation on SmolLM2", "ablation.py", argv, args.seeds, args.results_dir)
    panels = []
    for task in tasks:
        metrics = sweep.task_metrics(task)
        report.append(f"## {task}: {sweep.describe_budget(task, budget)}\n")
        for study in studies:
            study_runs = [run for run in runs if run.labels["task"] == task and run.labels["study"] == study]
            rows = sweep.summarize(study_runs, results, metrics)
            if study == "rank":
                label = sweep.metric_label(metrics[0])
                report += [f"### rank: {label} (α fixed at the preset)\n", rank_table(rows, metrics[0]), ""]
                panels.append((f"{task}: {label} vs r", rows, metrics[0]))
            else:
                title = "components, added one at a time" if study == "components" else f"variants at r={VARIANT_R}"
                report += [f"### {title}\n", sweep.markdown_table(rows, ["row", *metrics, "runs", "min/run"]), ""]
    text = "\n".join(report)
    print("\n" + text)
    sweep.write_report(f"{args.results_dir}/ablation.md", text)
    if panels:
        sweep.plot_panels(panels, x="r", series="method", path=f"{args.results_dir}/ablation.png")


if __name__ == "__main__":
    errors.run_cli(main)
