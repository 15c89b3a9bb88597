"""Does fine-tuning SmolLM2-135M on E2E beat the untuned model, and by how much with KaSA vs LoRA?
The five E2E metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr) of the untuned base model (train.py
--method lora --max-steps 0: evaluation only, the adapter is a zero update) next to KaSA and LoRA,
mean ± sample std over seeds, all scored on the same first test MRs.

This is bench/compare.py with other defaults (E2E only; KaSA and LoRA), so it shares its runs: a
configuration either script has finished is not run again. Budget per run (bench/sweep.py's): 100
steps × batch 8 on the dev set (no E2E train split offline), the first 50 test MRs, beam 4; ~4.5 min
per run on 2 free CPU cores, ~30 min for the default 2 methods × 3 seeds + base. Table:
RESULTS_DIR/e2e_quality.md.

    python bench/e2e_quality.py                                # base, kasa, lora; seeds 0,1,2
    python bench/e2e_quality.py --methods kasa,lora,pissa,milora
    python bench/e2e_quality.py --e2e-steps 300 --eval-mrs 630 --num-beams 10   # a faster machine
"""
import compare

import errors


def main(argv=None):
    return compare.main(argv, name="e2e_quality",
                        title="E2E on SmolLM2: the untuned base vs fine-tuned", doc=__doc__,
                        tasks="e2e", methods="kasa,lora")


if __name__ == "__main__":
    errors.run_cli(main)
