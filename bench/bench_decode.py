"""Is eval.py's decoding as fast as transformers' `generate`, with the same outputs?

Side by side in one run, on SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantized to float32; ours by
model.load_pretrained, transformers' by from_pretrained(gguf_file=...)) and the first --mrs unique
MRs of the E2E test set, prompted as training does (data.encode_e2e_context). With --adapter RUN_DIR
both decode the run's fine-tuned model: ours by eval.load_run (adapter merged), transformers' with
the same merged weights copied in (export.hf_state_dict); the run checks that the logits agree.
A fine-tuned model ends its texts early (eos, a blank line), which the untuned one rarely does.

  greedy   eval.greedy_search        vs generate(num_beams=1)
  beam     eval.beam_search (K=10)   vs generate(num_beams=10, length_penalty=0.9, early_stopping=False)

both with at most --max-new-tokens new tokens, the model's eos, and no repeated 4-gram in the
continuation: transformers bans n-grams that include the prompt, so its side runs its own
NoRepeatNGramLogitsProcessor on the generated tokens only, the rule eval.py follows. The blank-line
stop (--blank-line-stop, on by default) is a StoppingCriteria on transformers' side, by the same
token tables as eval.BlankLineStop (in beam search it ends single candidates). Prompts are sorted by
length, as eval.generate_texts does; transformers decodes them in left-padded batches of
--batch-size, ours keeps --batch-size prompts in flight (a finished prompt hands its rows to the
next one). Every continuation must be the same token for token: the run says how many are.

Timed runs alternate between the implementations (after one short untimed call each) and the
table reports medians; ratio = time ours / time transformers, below 1 is faster. --profile also
prints where our beam search spends one batch (torch.profiler, by operator). On a CPU shared with
other jobs keep --threads 1: torch's threads wait on each other whenever one is descheduled.

    python bench/bench_decode.py --model SmolLM2-135M-Instruct.Q4_1.gguf --data-dir DATA
    python bench/bench_decode.py --mrs 48 --repeats 3 --profile
    python bench/bench_decode.py --adapter RUN_DIR --out bench/results/bench_decode_tuned.json

--model defaults to $KASA_SMOLLM2_GGUF, --data-dir to $KASA_DATA_DIR (a folder holding e2e/, or the
E2E CSVs); with --adapter, --model defaults to the run's. Writes bench/results/bench_decode.json. Budget, on a 2-core CPU shared with other jobs
(1 thread): one greedy run of 32 MRs took 90 s (ours) and 170 s (transformers), one beam-10 run of
16 MRs 130-180 s each, so the defaults take about 40 minutes; --mrs 16 --skip greedy about 12.
"""
import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
import eval as E  # noqa: E402
import model as M  # noqa: E402
from errors import ConfigError, run_cli  # noqa: E402
from files import write_text_atomic  # noqa: E402


def e2e_prompts(data_dir: Path, tokenizer, eos_id: int, n: int) -> list[list[int]]:
    """The first n unique test MRs as prompts, shortest first (eval.generate_texts' order)."""
    folder = data_dir / "e2e" if (data_dir / "e2e").is_dir() else data_dir
    groups = data.group_references(data.load_e2e_split(data.resolve_e2e_files("original", folder)["test"]))
    return sorted((data.encode_e2e_context(tokenizer, mr, eos_id) for mr, _ in groups[:n]), key=len)


def continuation_no_repeat_ngram(n: int, prompt_len: int):
    """transformers' n-gram blocking on the tokens after the prompt only (the rule eval.py follows), as a
    logits processor (input_ids, scores) -> scores for a LogitsProcessorList. transformers is imported
    here, not at the top: it is not a runtime dependency of the project."""
    import transformers
    block = transformers.NoRepeatNGramLogitsProcessor(n)
    return lambda input_ids, scores: block(input_ids[:, prompt_len:], scores)


def transformers_decoder(hf, eos_id: int, pad_id: int, config: E.BeamSearchConfig, batch_size: int,
                         blank_line: E.BlankLineStop | None = None):
    """A function prompts -> continuations (cut before eos) by transformers' generate, in left-padded
    batches, banning repeated n-grams of the continuation only; with `blank_line`, a StoppingCriteria
    ends a row (a beam candidate, in beam search) whose continuation completes a blank line, by the
    same token tables as eval.BlankLineStop, so both sides stop at the same tokens."""
    import transformers

    class BlankLineCriteria(transformers.StoppingCriteria):
        def __init__(self, prompt_len):
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores, **kwargs):
            tokens = input_ids[:, self.prompt_len:]
            line_open = torch.zeros(len(tokens), dtype=torch.bool)
            for j in range(tokens.shape[1] - 1):  # the bit before the last token, as BlankLineStop.advance
                line_open = blank_line.advance(line_open, tokens[:, j])
            return blank_line.ending_tokens(line_open).gather(1, tokens[:, -1:])[:, 0]

    generation = transformers.GenerationConfig(
        num_beams=config.num_beams, max_new_tokens=config.max_new_tokens, do_sample=False,
        length_penalty=config.length_penalty, early_stopping=False, eos_token_id=eos_id, pad_token_id=pad_id)

    def decode(prompts):
        results = []
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first:first + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            stop = transformers.StoppingCriteriaList([BlankLineCriteria(width)] if blank_line is not None else [])
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, generation_config=generation, stopping_criteria=stop,
                                  logits_processor=transformers.LogitsProcessorList(
                                      [continuation_no_repeat_ngram(config.no_repeat_ngram_size, width)]))
            for row in out[:, width:].tolist():
                results.append(row[:row.index(eos_id)] if eos_id in row else row)
        return results
    return decode


def timed_alternately(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Seconds of every run and last outputs of each fn, calling them in turn `repeats` times."""
    times, outputs = {name: [] for name in fns}, {}
    for r in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
            print(f"  round {r + 1}/{repeats}: {name} {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    return times, outputs


def profile_beam_search(ours, prompts, eos_id, config, batch_size, blank_line=None) -> list[dict]:
    """Self time of our beam search's top operators over one batch of prompts."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        E.beam_search(ours, prompts[:batch_size], eos_id, config, blank_line, batch_size)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [dict(op=e.key, self_s=e.self_cpu_time_total / 1e6, share=e.self_cpu_time_total / total, calls=e.count)
            for e in events[:15]]
    print("\nour beam search, one batch, by operator (self CPU time)\n\n| operator | s | share | calls |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['op']} | {row['self_s']:.2f} | {row['share']:.1%} | {row['calls']} |")
    return rows


def parse_args(argv):
    """The flags, checked; with --adapter also the run's config.json (and its model, without --model)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("KASA_SMOLLM2_GGUF"),
                        help="SmolLM2 .gguf file (default: $KASA_SMOLLM2_GGUF)")
    parser.add_argument("--data-dir", default=os.environ.get("KASA_DATA_DIR"),
                        help="folder holding e2e/ or the E2E CSVs (default: $KASA_DATA_DIR)")
    parser.add_argument("--mrs", type=int, default=32, help="unique E2E test MRs decoded (default: 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded at once (default: 8)")
    parser.add_argument("--num-beams", type=int, default=10, help="beams of the beam search (default: 10)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens at most (default: 64)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per decoder (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, for a busy machine)")
    parser.add_argument("--skip", default="", help="comma-separated decoders to leave out: greedy,beam (default: none)")
    parser.add_argument("--adapter", metavar="RUN_DIR",
                        help="a train.py run directory: decode its fine-tuned model (adapter.safetensors merged, "
                             "eval.load_run), the same merged weights in transformers (default: none, the base model)")
    parser.add_argument("--blank-line-stop", action=argparse.BooleanOptionalAction, default=True,
                        help="also end a text at a blank line, on both sides (default: on)")
    parser.add_argument("--profile", action="store_true", help="also profile our beam search on one batch")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_decode.json"),
                        help="JSON results (default: bench/results/bench_decode.json)")
    args = parser.parse_args(argv)
    run_config = E.read_run_config(E.check_run_dir(args.adapter)) if args.adapter else None
    if run_config is not None and not args.model:
        args.model = run_config["model"]
    if not args.model or not Path(args.model).is_file():
        raise ConfigError(f"no SmolLM2 GGUF at {args.model!r}: pass --model FILE or set KASA_SMOLLM2_GGUF")
    if not args.data_dir or not Path(args.data_dir).is_dir():
        raise ConfigError(f"no data folder at {args.data_dir!r}: pass --data-dir DIR or set KASA_DATA_DIR")
    if min(args.mrs, args.batch_size, args.num_beams, args.max_new_tokens, args.repeats, args.threads) < 1:
        raise ConfigError("--mrs, --batch-size, --num-beams, --max-new-tokens, --repeats and --threads must be >= 1")
    return args, run_config


def load_models(args, run_config, gguf: Path):
    """(ours, tokenizer, transformers' model, the adapter's settings or None): the GGUF on both sides,
    or with --adapter the run's merged model, and the same merged weights (export's HF names) in transformers."""
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    if run_config is None:
        ours, tokenizer = M.load_pretrained(args.model, dtype=torch.float32)
        return ours.eval(), tokenizer, hf, None
    import export
    ours, tokenizer, _ = E.load_run(args.adapter)
    missing, unexpected = hf.load_state_dict(export.hf_state_dict(ours), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ConfigError(f"the run's merged weights do not fit transformers' model: missing {missing}, "
                          f"unexpected {unexpected}")
    hf.tie_weights()
    adapter = {name: run_config.get(name) for name in ("method", "r", "targets", "max_steps", "lr")}
    return ours.eval(), tokenizer, hf, adapter


def compare(beams: int, ours, hf, prompts, eos_id: int, pad_id: int, blank_line, args) -> tuple[str, dict]:
    """Time the decoder of `beams` beams (1: greedy) on both sides, after one short untimed call each;
    print its table row; return (its label, its results)."""
    config = E.BeamSearchConfig(num_beams=beams, max_new_tokens=args.max_new_tokens)
    search = E.greedy_search if beams == 1 else E.beam_search
    theirs = transformers_decoder(hf, eos_id, pad_id, config, args.batch_size, blank_line)
    fns = {"ours": lambda: search(ours, prompts, eos_id, config, blank_line, args.batch_size),
           "transformers": lambda: theirs(prompts)}
    warm = E.BeamSearchConfig(num_beams=beams, max_new_tokens=4)
    search(ours, prompts[:2], eos_id, warm, blank_line, 2)
    transformers_decoder(hf, eos_id, pad_id, warm, 2, blank_line)(prompts[:2])
    runs, out = timed_alternately(fns, args.repeats)
    t = {name: statistics.median(seconds) for name, seconds in runs.items()}
    same = sum(a == b for a, b in zip(out["ours"], out["transformers"]))
    mean_new = statistics.mean(len(o) for o in out["ours"])
    label = "greedy" if beams == 1 else f"beam-{beams}"
    print(f"| {label} | {t['ours']:.1f} | {t['transformers']:.1f} | {t['ours'] / t['transformers']:.3f} "
          f"| {same}/{len(prompts)} | {mean_new:.1f} |", flush=True)
    return label, dict(ours_s=t["ours"], transformers_s=t["transformers"], ratio=t["ours"] / t["transformers"],
                       same_outputs=same, mean_new_tokens=mean_new, runs_s=runs)


def main(argv=None):
    args, run_config = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")

    gguf = Path(args.model).resolve()
    ours, tokenizer, hf, adapter = load_models(args, run_config, gguf)
    eos_id, pad_id = data.eos_and_pad_ids(ours.config)
    blank_line = E.BlankLineStop(tokenizer, ours.config.vocab_size) if args.blank_line_stop else None
    prompts = e2e_prompts(Path(args.data_dir), tokenizer, eos_id, args.mrs)
    with torch.inference_mode():  # the same weights: the same logits
        probe = torch.tensor([prompts[0]])
        logit_diff = (ours(probe)[0] - hf(probe).logits).abs().max().item()
    if logit_diff > 1e-3:
        raise ConfigError(f"ours and transformers' logits differ by {logit_diff:.1e}: not the same weights")
    print(f"{gguf.name}{' + adapter ' + str(adapter) if adapter else ''}: "
          f"{len(prompts)} E2E test MRs ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), "
          f"batch {args.batch_size}, {args.max_new_tokens} new tokens at most, {args.threads} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"max |logit difference| ours vs transformers: {logit_diff:.1e}\n", flush=True)

    results = dict(model=gguf.name, adapter=adapter, blank_line_stop=args.blank_line_stop, mrs=len(prompts),
                   batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                   threads=args.threads, repeats=args.repeats, torch=torch.__version__,
                   transformers=transformers.__version__, logit_max_abs_diff=logit_diff,
                   load_average_at_start=os.getloadavg()[0], decoders={})
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write():  # after every decoder, so an interrupted run keeps what it measured
        results["load_average_at_end"] = os.getloadavg()[0]
        write_text_atomic(out_path, json.dumps(results, indent=2) + "\n")
    skip = set(filter(None, args.skip.split(",")))
    print("| decoder | ours s | transformers s | time ours / transformers | same tokens | mean new tokens |")
    print("|---|---|---|---|---|---|")
    for name, beams in (("greedy", 1), ("beam", args.num_beams)):
        if name not in skip:
            label, row = compare(beams, ours, hf, prompts, eos_id, pad_id, blank_line, args)
            results["decoders"][label] = row
            write()
    if args.profile:
        config = E.BeamSearchConfig(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
        results["beam_profile"] = profile_beam_search(ours, prompts, eos_id, config, args.batch_size, blank_line)
    write()
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    run_cli(main)
