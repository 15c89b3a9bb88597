"""Generation and evaluation: decode the E2E test set with a trained model, score it, and the
command line that does it for a finished run.

    python eval.py --checkpoint RUN_DIR         # decode and score a train.py run, as train.py did
    python eval.py --refs REFS --hyps HYPS      # prints the five E2E metrics as JSON
    python eval.py --plots RUN_DIR              # redraws a training run's PNGs (needs matplotlib)

Read top to bottom: the beam search, then the E2E evaluation (the one path train.py and
`--checkpoint` share: the same test MRs, beam settings and precision), then the command line.
The metric implementations (BLEU, NIST, METEOR, ROUGE-L, CIDEr, GLUE) live in metrics.py and the
plots in plots.py; their names are imported here, where train.py looks for them.
"""
import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F

from data import encode_e2e_context, eos_and_pad_ids, group_references, load_e2e_split, resolve_e2e_files
from errors import CheckpointError, ConfigError, DataError, reading, run_cli
from files import write_text_atomic
# bleu_score, glue_metrics and read_multi_references are not used below: train.py,
# bench/ and the tests reach them as eval.<name>.
from metrics import (bleu_score, e2e_metrics, glue_metrics, read_hypotheses,  # noqa: F401
                     read_multi_references, read_references, write_hypotheses, write_multi_references)
from plots import write_plots


# =============================================================================
# Generation: batched beam search with a KV cache
# =============================================================================
#
# The LoRA paper decodes E2E with beam search (10 beams, length penalty 0.9, no repeated 4-grams,
# at most 64 new tokens); KaSA reuses that setting. The search is the one transformers' `generate`
# runs with num_beams=K, early_stopping=False, vectorised over (prompts x beams):
#
#   1. Every running beam b has a summed log-probability s_b. Its continuations by token t score
#      s_b + log p(t | beam b), over all K*V (beam, token) pairs of a prompt.
#   2. Of the K best pairs, those that END the text (eos, or a blank line) become finished
#      hypotheses, scored (s_b + log p) / new_tokens ** length_penalty, where new_tokens counts
#      the ending token. A prompt keeps its K best finished hypotheses.
#   3. The K best pairs that do not end become the next running beams; the KV cache rows are
#      reordered to follow their parent beams.
#   4. A prompt is done once it holds K finished hypotheses and its best running beam, scored at
#      the current length, is no better than the worst of them (transformers' early_stopping=False
#      heuristic). At max_new_tokens every pair ends. The answer is the best finished hypothesis.
#
# One deliberate difference: a repeated n-gram is looked for in the continuation only, as the LoRA
# and fairseq decoders do. transformers also looks in the prompt, which on E2E forbids copying a
# 4-token slot value from the MR (" Crowne Plaza Hotel", " 5 out of 5"): 92% of the test set's
# references do that.


@dataclass(frozen=True)
class BeamSearchConfig:
    """Decoding settings; the defaults are the LoRA paper's E2E setting."""
    num_beams: int = 10
    max_new_tokens: int = 64
    length_penalty: float = 0.9  # finished score = sum of log-probs / new_tokens ** length_penalty
    no_repeat_ngram_size: int = 4  # 0: allow repeats


# A blank line: a newline, optional spaces or tabs, a newline. Generation stops at one, and the
# decoded text is cut at the first one (LoRA's E2E decoding stops at GPT-2's "\n\n" token too).
BLANK_LINE = re.compile(r"\n[^\S\n]*\n")


class BlankLineStop:
    """Which next tokens complete a blank line, for every beam at once.

    A blank line may sit inside one token ("\\n\\n", ".\\n\\n") or be spread over several ("\\n",
    " ", "\\n"), so each beam carries one bit, `line_open`: its text ends with a newline and
    optional spaces. Four tables over the vocabulary, from each token's decoded text, then say
        closes[t]     t's text holds a blank line                 -> t ends any beam
        completes[t]  t's text starts with spaces and a newline   -> t ends a beam whose line is open
        opens[t]      t's text ends with a newline and spaces     -> t opens a line
        blank[t]      t's text is only spaces (or empty)          -> t leaves the bit as it was
    """

    def __init__(self, tokenizer, vocab_size: int):
        known = min(vocab_size, tokenizer.get_vocab_size())
        texts = tokenizer.decode_batch([[i] for i in range(known)], skip_special_tokens=False)
        texts += [""] * (vocab_size - known)  # ids the tokenizer lacks (padded embedding rows)

        def table(pattern):
            return torch.tensor([re.search(pattern, text) is not None for text in texts])

        self.closes = table(BLANK_LINE.pattern)
        self.completes = table(r"\A[^\S\n]*\n")
        self.opens = table(r"\n[^\S\n]*\Z")
        self.blank = table(r"\A[^\S\n]*\Z")

    def to(self, device) -> "BlankLineStop":
        for name in ("closes", "completes", "opens", "blank"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def ending_tokens(self, line_open):
        """(R, V): which token would complete a blank line after each of R beams' texts."""
        return self.closes | (line_open[:, None] & self.completes)

    def advance(self, line_open, tokens):
        """Each beam's bit after appending tokens (R,)."""
        return self.opens[tokens] | (line_open & self.blank[tokens])


def block_repeated_ngrams(log_probs, generated, n: int) -> None:
    """Set to -inf, in place, every token that would repeat an n-gram of its row's continuation.

    log_probs (R, V); generated (R, L) holds each row's tokens so far. The n-grams seen are
    generated[i : i + n] for i = 0 .. L - n; a token is banned where its row's last n - 1 tokens
    equal the first n - 1 of a seen n-gram, and it equals that n-gram's last token.
    """
    L = generated.shape[1]
    if n <= 0 or L < n:
        return
    seen = L - n + 1  # number of complete n-grams so far
    matches = torch.ones(generated.shape[0], seen, dtype=torch.bool, device=generated.device)
    for j in range(n - 1):  # prefix token j of every seen n-gram vs token j of the current suffix
        matches &= generated[:, j:j + seen] == generated[:, seen + j:seen + j + 1]
    rows, starts = matches.nonzero(as_tuple=True)
    log_probs[rows, generated[rows, starts + n - 1]] = -math.inf


@torch.inference_mode()
def beam_search(model, prompts: list[list[int]], eos_token_id=None, config: BeamSearchConfig = BeamSearchConfig(),
                blank_line: BlankLineStop | None = None) -> list[list[int]]:
    """Beam-search all `prompts` (token id lists) as one batch; return each one's best continuation.

    eos_token_id: an id or a list of ids that end a hypothesis; they are left out of the result.
    blank_line: also end a hypothesis when its text completes a blank line (that token is kept).
    The batch holds len(prompts) * num_beams rows; `generate_texts` splits many prompts into batches.
    """
    if model.training:
        raise ValueError("beam_search needs the model in eval mode (dropout would make decoding random): "
                         "call model.eval() first")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("beam_search needs a non-empty list of non-empty prompts")
    cfg, K, V = config, config.num_beams, model.config.vocab_size
    width = max(len(p) for p in prompts)
    if model.pos_emb is not None and width + cfg.max_new_tokens > model.config.max_position:
        raise ValueError(f"a prompt of {width} tokens + max_new_tokens={cfg.max_new_tokens} exceeds the model's "
                         f"{model.config.max_position} positions; shorten the prompt or lower max_new_tokens")
    device = model.lm_head.weight.device
    eos_ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.zeros(V, dtype=torch.bool, device=device)
    is_eos[eos_ids] = True
    if blank_line is not None:
        blank_line.to(device)

    # Prefill: left-pad the prompts (positions come from the mask), run them once, and give each
    # prompt's K beams a copy of its cache. Rows are prompt-major: row = prompt * K + beam.
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    cache = model.new_cache(len(prompts), width + cfg.max_new_tokens)
    hidden = model.hidden_states(ids, attention_mask=mask, cache=cache)[:, -1].repeat_interleave(K, 0)
    cache.expand(K)
    mask = mask.repeat_interleave(K, 0)

    prompt_ids = torch.arange(len(prompts), device=device)  # the prompts still searched, in row order
    running = torch.full((len(prompts), K), -math.inf, device=device)
    running[:, 0] = 0.0  # the K copies are identical: only one may spawn continuations at first
    generated = torch.zeros(len(prompts) * K, cfg.max_new_tokens, dtype=torch.long, device=device)
    line_open = torch.zeros(len(prompts) * K, dtype=torch.bool, device=device)
    finished = torch.full((len(prompts), K), -math.inf, device=device)  # the K best finished scores
    best = [[] for _ in prompts]  # tokens of each prompt's best finished hypothesis
    for step in range(cfg.max_new_tokens):
        n_prompts = len(prompt_ids)
        log_probs = F.log_softmax(model.lm_head(hidden).float(), dim=-1)  # (rows, V), fp32 sums
        block_repeated_ngrams(log_probs, generated[:, :step], cfg.no_repeat_ngram_size)
        scores = (running[:, :, None] + log_probs.view(n_prompts, K, V)).view(n_prompts, K * V)
        if step == cfg.max_new_tokens - 1:  # at the length limit every pair ends
            ends = torch.ones_like(scores, dtype=torch.bool)
        else:
            ends = is_eos.expand(n_prompts * K, V)
            if blank_line is not None:
                ends = ends | blank_line.ending_tokens(line_open)
            ends = ends.reshape(n_prompts, K * V)

        # Finished hypotheses: the pairs among the K best that end here (step 2).
        top_scores, top_pairs = scores.topk(K, dim=1)
        new_length = step + 1
        candidates = torch.where(ends.gather(1, top_pairs), top_scores / new_length ** cfg.length_penalty, -math.inf)
        improves = candidates.max(1).values > finished[:, 0]
        finished = torch.cat([finished, candidates], 1).topk(K, dim=1).values
        for p in improves.nonzero().flatten().tolist():
            pair = top_pairs[p, candidates[p].argmax()].item()
            parent, token = p * K + pair // V, pair % V
            best[prompt_ids[p].item()] = generated[parent, :step].tolist() + ([] if token in eos_ids else [token])
        if step == cfg.max_new_tokens - 1:
            break

        # Running beams: the K best pairs that do not end (step 3); then drop the done prompts (step 4).
        running, pairs = scores.masked_fill(ends, -math.inf).topk(K, dim=1)
        done = finished[:, -1] >= running[:, 0] / new_length ** cfg.length_penalty  # -inf while not K finished
        keep = (~done).nonzero().flatten()
        if len(keep) == 0:
            break
        prompt_ids, running, finished, pairs = prompt_ids[keep], running[keep], finished[keep], pairs[keep]
        rows = (keep[:, None] * K + pairs // V).flatten()
        tokens = (pairs % V).flatten()
        cache.reorder(rows)
        mask = torch.cat([mask[rows], mask.new_ones(len(rows), 1)], dim=1)
        generated = generated[rows]
        generated[:, step] = tokens
        if blank_line is not None:
            line_open = blank_line.advance(line_open[rows], tokens)
        hidden = model.hidden_states(tokens[:, None], attention_mask=mask, cache=cache)[:, -1]
    return best


def generate_texts(model, tokenizer, prompts: list[list[int]], eos_token_id=None,
                   config: BeamSearchConfig = BeamSearchConfig(), batch_size: int = 8,
                   stop_at_blank_line: bool = True) -> list[str]:
    """Beam-search every prompt, `batch_size` prompts at a time, and return the decoded continuations,
    each cut at its first blank line and stripped. Prompts of similar length share a batch (less
    padding); the results come back in the prompts' order. Progress and ETA go to stderr."""
    blank_line = BlankLineStop(tokenizer, model.config.vocab_size) if stop_at_blank_line else None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts = [""] * len(prompts)
    start = time.time()
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        for i, ids in zip(batch, beam_search(model, [prompts[i] for i in batch], eos_token_id, config, blank_line)):
            texts[i] = BLANK_LINE.split(tokenizer.decode(ids), maxsplit=1)[0].strip()
        done = first + len(batch)
        rate = done / (time.time() - start)
        eta = timedelta(seconds=round((len(prompts) - done) / rate))
        print(f"decoded {done}/{len(prompts)} prompts | {rate:.2f} prompts/s | ETA {eta}", file=sys.stderr, flush=True)
    return texts


# =============================================================================
# E2E evaluation: decode every test MR, write the official file formats, score
# =============================================================================


def evaluate_e2e(model, tokenizer, groups: list[tuple[str, list[str]]], eos_token_id, out_dir,
                 beam: BeamSearchConfig = BeamSearchConfig(), batch_size: int = 8) -> dict:
    """Beam-search one output per unique MR, write predictions.txt and references.txt in the
    e2e-metrics formats (one output per line; reference groups separated by blank lines), and
    return the five metrics. `groups` is data.group_references(...) of the test split. The
    caller merges the adapter first, so decoding runs at the base model's speed."""
    out_dir = Path(out_dir)
    prompts = [encode_e2e_context(tokenizer, mr, eos_token_id) for mr, _ in groups]
    hyps = generate_texts(model, tokenizer, prompts, eos_token_id, beam, batch_size)
    write_hypotheses(out_dir / "predictions.txt", hyps)
    write_multi_references(out_dir / "references.txt", [refs for _, refs in groups])
    return {**e2e_metrics(hyps, [refs for _, refs in groups]), "eval_mrs": len(groups)}


def setting(config, name: str):
    """One setting of a run: `config` is train.py's TrainConfig or the dict of its config.json."""
    return config[name] if isinstance(config, dict) else getattr(config, name)


def run_precision(dtype: str, device_type: str, method: str = "kasa") -> tuple:
    """(autocast dtype or None, dtype of the frozen base weights) of a run's --dtype on a device, as
    train.py trains: auto is bf16 autocast on CUDA (fp16 where the GPU lacks bf16) and float32 on
    the CPU; on CUDA the frozen base is stored in the autocast dtype (half the memory), except for
    full fine-tuning, whose weights are trained and stay float32."""
    if dtype == "auto":
        bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
        amp_dtype = (torch.bfloat16 if bf16 else torch.float16) if device_type == "cuda" else None
    elif dtype in ("float32", "bfloat16", "float16"):
        amp_dtype = None if dtype == "float32" else getattr(torch, dtype)
    else:
        raise ConfigError(f"dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    on_gpu_base = device_type == "cuda" and amp_dtype is not None and method != "full"
    return amp_dtype, amp_dtype if on_gpu_base else torch.float32


def e2e_test_groups(config) -> list[tuple[str, list[str]]]:
    """The run's test MRs with their references, in the scorer's order (the first max_eval_examples)."""
    test = resolve_e2e_files(setting(config, "data_version"), setting(config, "data_dir"))["test"]
    groups = group_references(load_e2e_split(test))
    if not all(refs for _, refs in groups):
        raise DataError(f"{test} has no 'ref' column: the E2E test split needs its references (mr,ref)")
    return groups[:setting(config, "max_eval_examples") or None]


def e2e_evaluator(config, tokenizer):
    """The E2E evaluation of a run, the one both train.py and `eval.py --checkpoint` run.

    Reads the test set now (a bad file stops a run before it trains) and returns
    evaluate(model, out_dir) -> metrics, which decodes with the run's beam settings under the
    autocast train.py trains with on the model's device, writes predictions.txt and
    references.txt into out_dir, and scores them. The caller passes the merged model in eval mode.
    """
    groups = e2e_test_groups(config)
    beam = BeamSearchConfig(**{name: setting(config, name) for name in
                               ("num_beams", "max_new_tokens", "length_penalty", "no_repeat_ngram_size")})

    def evaluate(model, out_dir) -> dict:
        device_type = model.lm_head.weight.device.type
        amp_dtype, _ = run_precision(setting(config, "dtype"), device_type, setting(config, "method"))
        eos_id, _ = eos_and_pad_ids(model.config)
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return evaluate_e2e(model, tokenizer, groups, eos_id, out_dir, beam, setting(config, "eval_batch_size"))
    return evaluate


# =============================================================================
# A finished run: load its merged model, evaluate it again
# =============================================================================

RUN_FILES = ("config.json", "history.json", "adapter.safetensors", "truncation_report.json")
RUN_FIX = "is it the --out-dir of a finished train.py run? train again to rewrite it"
RUN_SETTINGS = ("task", "model", "method", "dtype", "data_version", "data_dir", "max_eval_examples",
                "num_beams", "max_new_tokens", "length_penalty", "no_repeat_ngram_size", "eval_batch_size")


def check_run_dir(run_dir) -> Path:
    """RUN_DIR as a Path, if it is a directory that a train.py run wrote (it holds one of RUN_FILES)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory; {RUN_FIX}" if run_dir.exists()
                              else f"{run_dir} does not exist; give the --out-dir of a train.py run")
    if not any((run_dir / name).is_file() for name in RUN_FILES):
        raise CheckpointError(f"{run_dir} is not a run directory: it holds none of {', '.join(RUN_FILES)}; "
                              "give the --out-dir of a train.py run")
    return run_dir


def read_run_config(run_dir: Path) -> dict:
    """RUN_DIR/config.json, checked to hold the settings the evaluation needs."""
    with reading(run_dir / "config.json", CheckpointError, RUN_FIX):
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    missing = [name for name in RUN_SETTINGS if not isinstance(config, dict) or name not in config]
    if missing:
        raise CheckpointError(f"{run_dir / 'config.json'} lacks the settings {missing}; {RUN_FIX}")
    return config


def load_run(run_dir, device="cpu"):
    """(model, tokenizer, config dict) of a finished training run: the pretrained model named in
    RUN_DIR/config.json, in the precision the run trained in, with RUN_DIR/adapter.safetensors
    loaded and merged (no SVD is run); full fine-tuning: the weights of RUN_DIR/checkpoint.pt."""
    from safetensors.torch import load_file

    import kasa
    from model import load_pretrained
    run_dir = check_run_dir(run_dir)
    config = read_run_config(run_dir)
    _, base_dtype = run_precision(config["dtype"], torch.device(device).type, config["method"])
    try:
        model, tokenizer = load_pretrained(config["model"], dtype=base_dtype, device=device)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load the run's model {config['model']!r} (config.json's 'model'): {e}") from e
    if config["method"] == "full":
        with reading(run_dir / "checkpoint.pt", CheckpointError, RUN_FIX):
            model.load_state_dict(torch.load(run_dir / "checkpoint.pt", map_location=device, weights_only=True)["model"])
        return model.eval(), tokenizer, config
    with reading(run_dir / "adapter.safetensors", CheckpointError, RUN_FIX):
        adapter = load_file(run_dir / "adapter.safetensors", device=str(device))
    try:
        kasa.load_kasa_state_dict(model, adapter)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{run_dir / 'adapter.safetensors'} does not fit the run's model "
                              f"{config['model']!r}: {e}") from e
    kasa.merge_kasa(model)
    return model.eval(), tokenizer, config


def evaluate_run(run_dir, task: str = "e2e") -> dict:
    """`python eval.py --checkpoint RUN_DIR`: decode and score with the run's own settings, write
    predictions.txt, references.txt and metrics.json (the scores replace the run's, its other
    entries, such as train_steps, stay)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run_dir = check_run_dir(run_dir)
    config = read_run_config(run_dir)
    if config["task"] != task:
        raise ConfigError(f"{run_dir} is a {config['task']!r} run, not {task!r}: eval.py --checkpoint decodes "
                          "E2E runs (a GLUE run's dev scores are in its metrics.json)")
    model, tokenizer, config = load_run(run_dir, device)
    if tokenizer is None:
        raise CheckpointError(f"the run's model {config['model']!r} ships no tokenizer; E2E decoding needs one")
    evaluate = e2e_evaluator(config, tokenizer)
    print(f"decoding the E2E test set with {run_dir}: {config['num_beams']} beams, "
          f"at most {config['max_new_tokens']} new tokens, on {device}", file=sys.stderr)
    metrics = evaluate(model, run_dir)
    previous = {}
    if (run_dir / "metrics.json").is_file():
        with reading(run_dir / "metrics.json", CheckpointError, RUN_FIX):
            previous = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    write_text_atomic(run_dir / "metrics.json", json.dumps({**previous, **metrics}, indent=2))
    print(json.dumps(metrics, indent=2))
    return metrics


# =============================================================================
# Command line
# =============================================================================


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score E2E NLG outputs with the official metrics, decode and "
                                                 "score a train.py run, or redraw a run's plots.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--refs",
                      help="references: UTF-8 text with one group of lines per output, groups separated by a "
                           "blank line, or an E2E CSV with mr,ref columns; needs --hyps (default: none)")
    mode.add_argument("--checkpoint", metavar="RUN_DIR",
                      help="decode the test set with a train.py run's merged adapter and score it, as the run "
                           "did; writes predictions.txt, references.txt, metrics.json there (default: none)")
    mode.add_argument("--plots", metavar="RUN_DIR",
                      help="redraw a training run's PNGs into RUN_DIR/plots: loss curves, Δσ heat map, kept vs "
                           "dropped spectrum (default: none)")
    parser.add_argument("--hyps", help="system outputs, one line per MR in the references' order (default: none)")
    parser.add_argument("--task", default="e2e", choices=["e2e"],
                        help="the task of --checkpoint; it must be the run's (default: e2e)")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback (default: off; KASA_DEBUG=1 does the same)")
    return parser


def main(argv=None) -> dict:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.hyps is not None and args.refs is None:
        parser.error("--hyps needs --refs (the references to score against)")
    if args.plots:
        paths = write_plots(check_run_dir(args.plots))
        for path in paths:
            print(f"wrote {path}")
        return {"plots": [str(path) for path in paths]}
    if args.checkpoint:
        return evaluate_run(args.checkpoint, args.task)
    if args.refs is None or args.hyps is None:
        parser.error("give --refs REFS --hyps HYPS (outputs to score), --checkpoint RUN_DIR, or --plots RUN_DIR")
    refs, hyps = read_references(args.refs), read_hypotheses(args.hyps)
    if len(hyps) != len(refs):
        raise DataError(f"{args.hyps} holds {len(hyps)} outputs but {args.refs} holds {len(refs)} reference "
                        "groups; give one output per line, in the order of the reference groups")
    scores = e2e_metrics(hyps, refs)
    print(json.dumps(scores, indent=2))
    return scores


if __name__ == "__main__":
    run_cli(main)
