"""Does GLUE fine-tuning learn on a real model? SmolLM2-135M with KaSA and with LoRA on subsets of
SST-2 and RTE, next to the majority-class baseline, side by side in one run.

This is bench/compare.py with other defaults (SST-2 and RTE; KaSA and LoRA; one seed), so it
shares its runs. Every run is train.py with the task's preset (the official KaSA GLUE script's lr,
β, γ, r=8, α=16, 6% warmup) except for the batch size and the budget: one epoch over the first
steps × batch training rows, scored on the first dev rows, the same rows for every method. The
majority class is the most frequent label among those training rows. Budget per run (bench/sweep.py's):
100 steps × batch 8, 400 dev rows, max length 128; ~2 min per run on 2 free CPU cores. Table:
RESULTS_DIR/glue_quality.md.

    python bench/glue_quality.py                                   # SST-2 and RTE, KaSA and LoRA, seed 0
    python bench/glue_quality.py --glue-steps 300 --batch-size 16 --dev-rows 872
    python bench/glue_quality.py --tasks sst2 --methods kasa,lora,pissa --seeds 0,1,2
"""
import compare

import errors


def main(argv=None):
    return compare.main(argv, name="glue_quality",
                        title="GLUE on SmolLM2: fine-tuned vs the majority class", doc=__doc__,
                        tasks="sst2,rte", methods="kasa,lora", seeds="0")


if __name__ == "__main__":
    errors.run_cli(main)
