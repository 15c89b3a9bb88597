"""Length grouping (train.py --group-by-length): how much faster is a training step, and does the
quality hold? Both on SmolLM2-135M and the real E2E data.

1. speed, side by side in one process: the same examples (--speed-batches batches of 8 from the
   dev set, drawn with seed 0) batched the two ways train.py batches them (train.epoch_batches:
   random, or sorted within chunks of 50 batches, then the batches shuffled), and the E2E preset's
   KaSA training step (r=4, α=32 on q_proj,v_proj; task loss + β·L2 + γ·L3, backward, AdamW) on one
   batch of each way in turn, after two untimed steps each. Both ways hold the same real tokens, so
   the ratio of their times is the ratio of their real tokens/s. Also the share of padding over a
   whole epoch of the 4,672 dev rows, each way.
2. quality at the comparison budget of bench/compare.py (E2E, 100 steps × batch 8 on the dev set,
   first 50 test MRs, beam 4): KaSA and LoRA, seeds 0,1,2, with --group-by-length, beside the same
   runs without it (compare.py's, shared through runs.jsonl: the same flags are the same run).

Writes RESULTS_DIR/batching.md and RESULTS_DIR/batching_speed.json. Budget: the speed part takes
~5 min on 2 free CPU cores (50 batches each way), each quality run 4-5 min.

    python bench/batching.py                       # speed, then the quality runs still missing
    python bench/batching.py --speed-batches 0     # quality only
    python bench/batching.py --report-only         # the tables of what has finished so far
"""
import json
import time
from pathlib import Path

import torch

import sweep
from sweep import Run

import data
import errors
import kasa
import model as M
import train

METHODS = ("kasa", "lora")


def dev_examples(e2e_dir, tokenizer, eos_id: int, max_len: int) -> list:
    rows = data.load_e2e_split(data.resolve_e2e_files("original", e2e_dir)["dev"])
    return [data.encode_e2e_example(tokenizer, ex.mr, ex.ref, eos_id, max_len) for ex in rows]


def padding_share(lengths: list, batches: list) -> float:
    """Padded positions / all positions, when every batch is padded to its longest example."""
    real = sum(lengths[i] for batch in batches for i in batch)
    total = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1 - real / total


def training_step(model, config, optimizer):
    """One KaSA step as train.py takes it (float32, no accumulation): Eq. 11's loss, backward, AdamW."""
    def step(batch):
        loss = model.loss(batch["input_ids"], batch["targets"], attention_mask=batch["attention_mask"],
                          label_smoothing=config.label_smoothing)
        l2, l3 = kasa.kasa_regularization(model)
        (loss + config.beta * l2 + config.gamma * l3).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure_speed(budget: sweep.Budget, n_batches: int) -> dict:
    config = train.TrainConfig()  # the E2E preset: r=4, α=32, β, γ, label smoothing, max length
    model, tokenizer = M.load_pretrained(budget.model)
    eos_id, pad_id = data.eos_and_pad_ids(model.config)
    examples = dev_examples(budget.e2e_data, tokenizer, eos_id, config.max_len)
    lengths = [len(example[0]) for example in examples]
    size = budget.batch_size
    epoch = {way: padding_share(lengths, train.epoch_batches(lengths, size, 0, 0, way == "grouped"))
             for way in ("random", "grouped")}
    chosen = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))[:n_batches * size].tolist()
    ways = {way: [[chosen[i] for i in batch] for batch in
                  train.epoch_batches([lengths[i] for i in chosen], size, 0, 0, way == "grouped")]
            for way in ("random", "grouped")}
    kasa.apply_kasa(model, targets=config.targets, r=config.r, alpha=config.alpha, dropout=config.adapter_dropout)
    trainable = [p for p in model.parameters() if p.requires_grad]
    step = training_step(model.train(), config, torch.optim.AdamW(trainable, lr=config.lr))
    collate = {way: [data.collate_e2e([examples[i] for i in batch], pad_id=pad_id) for batch in batches]
               for way, batches in ways.items()}
    real_tokens = {way: sum(int(b["attention_mask"].sum()) for b in batches) for way, batches in collate.items()}
    assert real_tokens["random"] == real_tokens["grouped"], "both ways must hold the same examples"
    seconds = {way: 0.0 for way in ways}
    print(f"speed: {n_batches} batches of {size} each way, {real_tokens['random']:,} real tokens; "
          f"KaSA r={config.r} on {','.join(config.targets)}, {torch.get_num_threads()} threads", flush=True)
    for way in ways:  # warm-up, untimed
        for batch in collate[way][:2]:
            step(batch)
    for i in range(n_batches):
        for way in ways:
            start = time.perf_counter()
            step(collate[way][i])
            seconds[way] += time.perf_counter() - start
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{n_batches} batches: random {seconds['random']:.0f} s, grouped "
                  f"{seconds['grouped']:.0f} s", flush=True)
    sample = {way: padding_share(lengths, batches) for way, batches in ways.items()}
    return {"model": Path(budget.model).name, "batches": n_batches, "batch_size": size, "threads": torch.get_num_threads(),
            "real_tokens": real_tokens["random"], "seconds": seconds,
            "tokens_per_s": {way: real_tokens[way] / s for way, s in seconds.items()},
            "speedup": seconds["random"] / seconds["grouped"],
            "padding_share_sample": sample, "padding_share_epoch": epoch}


def speed_table(result: dict) -> str:
    rows = [{"batching": way, "real tok/s": f"{result['tokens_per_s'][way]:.0f}",
             "padding (these batches)": f"{result['padding_share_sample'][way]:.1%}",
             "padding (one epoch)": f"{result['padding_share_epoch'][way]:.1%}"} for way in ("random", "grouped")]
    return sweep.markdown_table(rows, list(rows[0]))


def build_runs(budget: sweep.Budget, seeds: list) -> list:
    return [Run(f"e2e-{method}-s{seed}" + "-grouped" * grouped,
                sweep.run_flags("e2e", budget, method, seed, extra=["--group-by-length"] * grouped),
                {"method": method, "batching": "grouped" if grouped else "random", "seed": seed})
            for seed in seeds for method in METHODS for grouped in (False, True)]


def main(argv=None):
    parser = sweep.sweep_arg_parser(__doc__)
    parser.add_argument("--speed-batches", type=int, default=50,
                        help="batches timed each way in the speed part; 0 skips it (default: %(default)s)")
    args = parser.parse_args(argv)
    budget, results_dir = sweep.budget_from_args(args), Path(args.results_dir)
    speed_path = results_dir / "batching_speed.json"
    if args.speed_batches and not (args.dry_run or args.report_only):
        if budget.model is None or budget.e2e_data is None:
            raise errors.ConfigError(f"the speed part needs the model and the E2E data: --model / ${sweep.MODEL_ENV} "
                                     f"and --data-dir / ${sweep.DATA_ENV}")
        speed = measure_speed(budget, args.speed_batches)
        sweep.write_report(speed_path, json.dumps(speed, indent=2))
    runs = build_runs(budget, sweep.seeds_from_args(args))
    results = sweep.run_sweep(runs, results_dir, dry_run=args.dry_run, report_only=args.report_only)
    if args.dry_run:
        return
    report = sweep.report_header("Length grouping on SmolLM2", "batching.py", argv, args.seeds, results_dir)
    if speed_path.is_file():
        speed = json.loads(speed_path.read_text())
        report += [f"## Speed: the KaSA training step (E2E preset, r=4 on q,v), {speed['batches']} batches of "
                   f"{speed['batch_size']} each way, the same examples, {speed['threads']} threads\n",
                   speed_table(speed), "", f"Grouped / random real tokens/s: **{speed['speedup']:.2f}×**.\n"]
    metrics = sweep.task_metrics("e2e")
    rows = sweep.summarize(runs, results, metrics)
    report += [f"## Quality: e2e, {sweep.describe_budget('e2e', budget)}\n",
               sweep.markdown_table(rows, ["method", "batching", *metrics, "runs", "min/run"]), ""]
    text = "\n".join(report)
    print("\n" + text)
    sweep.write_report(results_dir / "batching.md", text)


if __name__ == "__main__":
    errors.run_cli(main)
