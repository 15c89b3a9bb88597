"""Generation and evaluation: decode the E2E test set with a trained model, score it, and the
command line that does it for a finished run.

    python eval.py --checkpoint RUN_DIR         # decode and score a train.py run, as train.py did
    python eval.py --refs REFS --hyps HYPS      # prints the five E2E metrics as JSON
    python eval.py --plots RUN_DIR              # redraws a training run's PNGs (needs matplotlib)

Read top to bottom: the decoders, the E2E evaluation (the one path train.py and `--checkpoint` share),
the command line. Metrics (metrics.py), plots (plots.py) and run directories (runs.py) are imported.
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

from data import e2e_test_groups, encode_e2e_context, eos_and_pad_ids
from errors import CheckpointError, ConfigError, run_cli
# Metrics and the run directory (files, settings, precision, loading) live in metrics.py and runs.py;
# train.py, bench/ and the tests still reach some of them as eval.<name>.
from metrics import (bleu_score, e2e_metrics, glue_metrics, read_hypotheses,  # noqa: F401
                     read_multi_references, read_references, score_files, write_hypotheses, write_multi_references)
from plots import write_plots
from runs import (RUN_FILES, RUN_FIX, RUN_SETTINGS, check_run_dir, load_run, read_run_config,  # noqa: F401
                  run_precision, setting, update_run_metrics)


# ============================================= generation: beam search and greedy decoding, KV cache
# The LoRA paper decodes E2E with beam search (10 beams, length penalty 0.9, no repeated 4-grams,
# at most 64 new tokens); KaSA reuses that setting. The search is transformers' `generate` with
# num_beams=K, early_stopping=False, vectorised over (prompts x beams):
#   1. A running beam b has a summed log-probability s_b; its continuation by token t scores
#      s_b + log p(t | b), over all K*V (beam, token) pairs of a prompt.
#   2. Of the K best pairs, those that END the text (eos, or a blank line) become finished
#      hypotheses, scored (s_b + log p) / new_tokens ** length_penalty (new_tokens counts the
#      ending token). A prompt keeps its K best.
#   3. The K best pairs that do not end are the next running beams; the cache rows follow them.
#   4. A prompt is done once it holds K finished hypotheses and its best running beam, scored at
#      the current length, is no better than the worst of them. At max_new_tokens every pair ends.
# With num_beams=1 decoding is greedy (one row per prompt, the most likely allowed token). Both
# decoders share the n-gram ban and the end of text, and keep the batch full: a prompt that is done
# hands its rows to the next waiting one (`PromptBatch`), so late steps do not run nearly empty.
#
# One deliberate difference: a repeated n-gram is looked for in the continuation only, as the LoRA
# and fairseq decoders do. transformers also looks in the prompt, which on E2E forbids copying a
# 4-token slot value from the MR (" Crowne Plaza Hotel"): 92% of the test references do that.


@dataclass(frozen=True)
class BeamSearchConfig:
    """Decoding settings; the defaults are the LoRA paper's E2E setting."""
    num_beams: int = 10  # 1: greedy decoding
    max_new_tokens: int = 64
    length_penalty: float = 0.9  # finished score = sum of log-probs / new_tokens ** length_penalty
    no_repeat_ngram_size: int = 4  # 0: allow repeats

    def __post_init__(self):
        if self.num_beams < 1 or self.max_new_tokens < 1 or self.no_repeat_ngram_size < 0:
            raise ConfigError(f"{self}: decoding needs num_beams >= 1, max_new_tokens >= 1, no_repeat_ngram_size >= 0")


# A blank line: a newline, optional spaces or tabs, a newline. Generation stops at one, and the
# decoded text is cut at the first one (LoRA's E2E decoding stops at GPT-2's "\n\n" token too).
BLANK_LINE = re.compile(r"\n[^\S\n]*\n")


class BlankLineStop:
    """Which next tokens complete a blank line, for every row at once. A blank line may sit inside one
    token ("\\n\\n") or span several ("\\n", " ", "\\n"), so each row carries one bit, `line_open`: its
    text ends with a newline and optional spaces. Tables over the vocabulary, from each token's text:
    closes[t] holds a blank line (ends any row); completes[t] starts with spaces and a newline (ends a
    row whose line is open); opens[t] ends with a newline and spaces; blank[t] is only spaces."""

    def __init__(self, tokenizer, vocab_size: int):
        known = min(vocab_size, tokenizer.get_vocab_size())
        texts = tokenizer.decode_batch([[i] for i in range(known)], skip_special_tokens=False)
        texts += [""] * (vocab_size - known)  # ids the tokenizer lacks (padded embedding rows)
        self.closes, self.completes, self.opens, self.blank = (
            torch.tensor([re.search(pattern, text) is not None for text in texts])
            for pattern in (BLANK_LINE.pattern, r"\A[^\S\n]*\n", r"\n[^\S\n]*\Z", r"\A[^\S\n]*\Z"))

    def to(self, device) -> "BlankLineStop":
        for name in ("closes", "completes", "opens", "blank"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def ending_tokens(self, line_open):
        """(R, V): which token would complete a blank line after each of R rows' texts."""
        return self.closes | (line_open[:, None] & self.completes)

    def advance(self, line_open, tokens):
        """Each row's bit after appending tokens (R,)."""
        return self.opens[tokens] | (line_open & self.blank[tokens])


def ending_tokens(is_eos, blank_line, line_open, at_limit):
    """(R, V): which next token ends each row's text: eos, a blank line, or any token at the length
    limit (at_limit (R,) bool: the row's next token is its max_new_tokens-th)."""
    ends = is_eos | at_limit[:, None]
    return ends | blank_line.ending_tokens(line_open) if blank_line is not None else ends


def block_repeated_ngrams(scores, generated, lengths, n: int) -> None:
    """Set to -inf, in place, every token that would repeat an n-gram of its row's continuation.
    scores (R, V); generated (R, L) holds each row's tokens, lengths (R,) how many so far. The n-grams
    seen are generated[r, i : i + n] for i = 0 .. lengths[r] - n; a token is banned where its row's
    last n - 1 tokens equal the first n - 1 of a seen n-gram and it is that n-gram's last token.
    No host sync: the bans are a scatter of min(score, -inf or +inf)."""
    R, L = generated.shape
    if n <= 0 or L < n:
        return
    starts = torch.arange(L - n + 1, device=generated.device)
    matches = starts <= (lengths[:, None] - n)  # (R, L - n + 1): the complete n-grams so far
    for j in range(n - 1):  # prefix token j of every seen n-gram vs token j of the current suffix
        suffix_j = generated.gather(1, (lengths - n + 1 + j).clamp(min=0)[:, None])
        matches &= generated[:, j:j + L - n + 1] == suffix_j
    bans = torch.where(matches, -math.inf, math.inf).to(scores.dtype)
    scores.scatter_reduce_(1, generated[:, n - 1:], bans, reduce="amin")


class PromptBatch:
    """A decoder's prompts, checked, and continuous batching: up to `batch_size` (default: all) in flight
    in slots of `rows_per_prompt` cache rows (a prompt's beams); a prompt that is done hands its rows to
    the next waiting one. Every row feeds one token per step at its own position (the KV cache is filled
    row by row), so a prompt decodes as it would alone (up to the rounding of other batch shapes). It is
    prefilled with all its tokens but the last, in a cache of its own copied into its rows; the last goes
    with the next shared step, whose logits are its first. is_eos (V,): the eos ids; results: the answers."""

    def __init__(self, model, prompts, rows_per_prompt: int, config: BeamSearchConfig, eos_token_id=None,
                 blank_line: "BlankLineStop | None" = None, batch_size: int | None = None):
        if model.training:
            raise ConfigError("decoding needs the model in eval mode (dropout makes it random): model.eval()")
        if not prompts or any(len(p) == 0 for p in prompts) or (batch_size or 1) < 1:
            raise ConfigError("decoding needs a non-empty list of non-empty prompts, and batch_size >= 1 "
                              f"({batch_size})")
        width = max(len(p) for p in prompts)
        if model.pos_emb is not None and width + config.max_new_tokens > model.config.max_position:
            raise ConfigError(f"a prompt of {width} tokens + max_new_tokens={config.max_new_tokens} exceeds the "
                              f"model's {model.config.max_position} positions; shorten the prompt or lower "
                              "max_new_tokens")
        self.model, self.prompts, self.K, self.device = model, prompts, rows_per_prompt, model.lm_head.weight.device
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.is_eos = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=self.device)
        self.is_eos[eos] = True
        if blank_line is not None:
            blank_line.to(self.device)
        self.waiting = list(range(len(prompts)))[::-1]  # pop() gives the next prompt
        slots = min(batch_size or len(prompts), len(prompts))
        self.cache = model.new_cache(slots * self.K, width + config.max_new_tokens)
        self.prompt_ids = [-1] * slots  # which prompt each slot holds
        self.prefilled = [0] * slots  # its prefilled length: cache positions its rows all share
        self.tokens = torch.zeros(slots * self.K, dtype=torch.long, device=self.device)  # each row's next input
        self.results = [None] * len(prompts)

    num_slots = property(lambda self: len(self.prompt_ids))

    def rows(self, slots) -> torch.Tensor:
        """The cache rows of `slots`, slot-major."""
        return (torch.as_tensor(slots, dtype=torch.long, device=self.device)[:, None] * self.K
                + torch.arange(self.K, device=self.device)).flatten()

    def logits(self):
        """(rows, V) float32: the next-token logits after each row's next token."""
        return self.model.lm_head(self.model.hidden_states(self.tokens[:, None], cache=self.cache)[:, -1]).float()

    def start(self, slots: list[int]) -> list[int]:
        """Start the next waiting prompts in free `slots`, as many as are waiting; return the slots started."""
        slots = slots[:len(self.waiting)]
        if not slots:
            return slots
        new = [self.waiting.pop() for _ in slots]
        heads = [self.prompts[i][:-1] for i in new]
        width = max(len(h) for h in heads)
        prefill = self.model.new_cache(len(new), width) if width else None
        if width:  # right padding: under causal attention a prompt never sees the padding after it
            self.model.hidden_states(torch.tensor([h + [0] * (width - len(h)) for h in heads], device=self.device),
                                     cache=prefill)
        rows, each = self.rows(slots), torch.arange(len(new), device=self.device).repeat_interleave(self.K)
        self.cache.start_rows(rows, torch.tensor([len(h) for h in heads], device=self.device)[each], prefill, each)
        self.tokens[rows] = torch.tensor([self.prompts[i][-1] for i in new], device=self.device)[each]
        for slot, i, head in zip(slots, new, heads):
            self.prompt_ids[slot], self.prefilled[slot] = i, len(head)
        return slots

    def finish(self, done: list[int], answer, on_done) -> tuple[list[int], list[int]]:
        """results[prompt] = answer(slot) for every `done` slot; return (the slots to keep, the done
        slots that a waiting prompt takes); the others, which no prompt will take, are dropped."""
        for slot in done:
            self.results[self.prompt_ids[slot]] = answer(slot)
            if on_done is not None:
                on_done(self.prompt_ids[slot])
        dropped = set(done[len(self.waiting):])
        keep = [s for s in range(self.num_slots) if s not in dropped]
        return keep, [keep.index(s) for s in done if s not in dropped]

    def reorder(self, keep: list[int], rows, tokens) -> None:
        """Keep slots `keep`, in order; cache row i takes over row rows[i] (its parent beam's) and
        feeds tokens[i] next."""
        self.prompt_ids, self.prefilled = [self.prompt_ids[s] for s in keep], [self.prefilled[s] for s in keep]
        self.cache.reorder(rows, start=min(self.prefilled, default=0))
        self.tokens = tokens


@torch.inference_mode()
def greedy_search(model, prompts: list[list[int]], eos_token_id=None, config: BeamSearchConfig = BeamSearchConfig(),
                  blank_line: BlankLineStop | None = None, batch_size: int | None = None,
                  on_done=None) -> list[list[int]]:
    """Greedy decoding of every prompt (token id lists): at each step the most likely token the n-gram
    rule allows, until the text ends; returns each continuation, eos left out. batch_size prompts
    (default: all) are decoded at once, one row each; on_done(i) is called when prompt i is done."""
    batch = PromptBatch(model, prompts, 1, config, eos_token_id, blank_line, batch_size)
    S, device, is_eos = batch.num_slots, batch.device, batch.is_eos
    generated = torch.zeros(S, config.max_new_tokens, dtype=torch.long, device=device)
    steps = torch.zeros(S, dtype=torch.long, device=device)  # tokens generated so far
    line_open = torch.zeros(S, dtype=torch.bool, device=device)
    batch.start(list(range(S)))
    while batch.num_slots:
        logits = batch.logits()
        block_repeated_ngrams(logits, generated, steps, config.no_repeat_ngram_size)
        tokens = logits.argmax(-1)
        rows = torch.arange(len(tokens), device=device)
        ends = ending_tokens(is_eos, blank_line, line_open, steps == config.max_new_tokens - 1)[rows, tokens]
        generated[rows, steps] = tokens
        steps += (~is_eos[tokens]).long()  # an eos is not part of the answer
        if blank_line is not None:
            line_open = blank_line.advance(line_open, tokens)
        batch.tokens = tokens
        done = ends.nonzero().flatten().tolist()  # the one host sync of a step
        if not done:
            continue
        keep, restart = batch.finish(done, lambda s: generated[s, :steps[s]].tolist(), on_done)
        if len(keep) < len(rows):  # no prompt waits for the others
            batch.reorder(keep, torch.tensor(keep, dtype=torch.long, device=device), tokens[keep])
            generated, steps, line_open = generated[keep], steps[keep], line_open[keep]
        started = batch.start(restart)
        steps[started], line_open[started] = 0, False
    return batch.results


def top_pairs(running, logits, log_norm, K: int):
    """The K best (beam, token) pairs of every prompt by s_b + log p(t | b) (steps 1-3): (scores, parent
    beams, tokens), each (prompts, K). They are among the K best tokens of each beam, so only K*K pairs
    are ranked, not K*V. running (prompts, K); logits (prompts*K, V); log-probs = logits - log_norm."""
    values, tokens = logits.topk(K, dim=-1)
    scores, pairs = (running.reshape(-1, 1) + (values - log_norm)).view(-1, K * K).topk(K, dim=1)
    return scores, pairs // K, tokens.view(-1, K * K).gather(1, pairs)


class Hypotheses:
    """Each prompt's finished hypotheses (step 2): the K best scores, best first, and the best one's tokens."""

    def __init__(self, slots: int, K: int, max_new_tokens: int, device):
        self.scores = torch.full((slots, K), -math.inf, device=device)
        self.best = torch.zeros(slots, max_new_tokens, dtype=torch.long, device=device)
        self.best_length = torch.zeros(slots, dtype=torch.long, device=device)

    def add(self, candidates, generated, parent_rows, tokens, steps, is_eos) -> None:
        """candidates (slots, K): scores of the top pairs (parent_rows, tokens) that end here, else -inf."""
        improves = candidates.max(1).values > self.scores[:, 0]
        self.scores = torch.cat([self.scores, candidates], 1).topk(self.scores.shape[1], dim=1).values
        pick = candidates.argmax(1, keepdim=True)
        token = tokens.gather(1, pick)[:, 0]
        hypothesis = generated[parent_rows.gather(1, pick)[:, 0]]
        hypothesis[torch.arange(len(token), device=token.device), steps] = token
        self.best = torch.where(improves[:, None], hypothesis, self.best)
        self.best_length = torch.where(improves, steps + (~is_eos[token]).long(), self.best_length)

    def keep(self, slots) -> None:  # drop the others
        self.scores, self.best, self.best_length = self.scores[slots], self.best[slots], self.best_length[slots]


@torch.inference_mode()
def beam_search(model, prompts: list[list[int]], eos_token_id=None, config: BeamSearchConfig = BeamSearchConfig(),
                blank_line: BlankLineStop | None = None, batch_size: int | None = None,
                on_done=None) -> list[list[int]]:
    """Beam-search every prompt (token id lists); return each one's best continuation. eos_token_id:
    an id or a list of ids that end a hypothesis (left out of the result); blank_line: also end one
    whose text completes a blank line (that token is kept). batch_size prompts (default: all) are
    searched at once, num_beams rows each; on_done(i) is called when prompt i is done."""
    cfg, K = config, config.num_beams
    batch = PromptBatch(model, prompts, K, cfg, eos_token_id, blank_line, batch_size)
    S, device, is_eos = batch.num_slots, batch.device, batch.is_eos
    running = torch.full((S, K), -math.inf, device=device)  # s_b of every running beam
    finished = Hypotheses(S, K, cfg.max_new_tokens, device)
    steps = torch.zeros(S, dtype=torch.long, device=device)  # tokens generated so far
    generated = torch.zeros(S * K, cfg.max_new_tokens, dtype=torch.long, device=device)
    line_open = torch.zeros(S * K, dtype=torch.bool, device=device)

    def restart(slots):
        running[slots] = -math.inf
        running[slots, 0] = 0.0  # the K copies are identical: only one may spawn continuations at first
        finished.scores[slots], steps[slots], line_open[batch.rows(slots)] = -math.inf, 0, False

    restart(batch.start(list(range(S))))
    while batch.num_slots:
        n = batch.num_slots
        slot_rows = torch.arange(n, device=device)[:, None] * K
        logits = batch.logits()  # (n * K, V)
        log_norm = logits.logsumexp(-1, keepdim=True)  # of the model's distribution, before the ban
        block_repeated_ngrams(logits, generated, steps.repeat_interleave(K), cfg.no_repeat_ngram_size)
        ends = ending_tokens(is_eos, blank_line, line_open, (steps == cfg.max_new_tokens - 1).repeat_interleave(K))

        # Finished hypotheses: the pairs among the K best that end here (step 2).
        top_scores, top_parents, top_tokens = top_pairs(running, logits, log_norm, K)
        length_norm = (steps + 1)[:, None].float() ** cfg.length_penalty
        candidates = torch.where(ends[slot_rows + top_parents, top_tokens], top_scores / length_norm, -math.inf)
        finished.add(candidates, generated, slot_rows + top_parents, top_tokens, steps, is_eos)

        # Running beams: the K best pairs that do not end (step 3); a prompt is done by step 4.
        running, parents, tokens = top_pairs(running, logits.masked_fill_(ends, -math.inf), log_norm, K)
        done = (finished.scores[:, -1] >= running[:, 0] / length_norm[:, 0]) | (steps == cfg.max_new_tokens - 1)
        rows, tokens = (slot_rows + parents).flatten(), tokens.flatten()
        generated = generated[rows]
        generated[torch.arange(n * K, device=device), steps.repeat_interleave(K)] = tokens
        if blank_line is not None:
            line_open = blank_line.advance(line_open[rows], tokens)
        steps += 1
        done = done.nonzero().flatten().tolist()  # the one host sync of a step
        keep, free = batch.finish(done, lambda s: finished.best[s, :finished.best_length[s]].tolist(), on_done)
        if len(keep) < n:  # no prompt waits for the slots dropped
            rows, kept_rows = rows.view(n, K)[keep].flatten(), batch.rows(keep)
            running, steps = running[keep], steps[keep]
            finished.keep(keep)
            generated, line_open, tokens = generated[kept_rows], line_open[kept_rows], tokens[kept_rows]
        batch.reorder(keep, rows, tokens)  # each beam's cache rows follow its parent
        restart(batch.start(free))
    return batch.results


def generate_texts(model, tokenizer, prompts: list[list[int]], eos_token_id=None,
                   config: BeamSearchConfig = BeamSearchConfig(), batch_size: int = 8,
                   stop_at_blank_line: bool = True) -> list[str]:
    """Decode every prompt (beam search, or greedy with num_beams=1), `batch_size` prompts in flight,
    and return the decoded continuations, each cut at its first blank line and stripped. Prompts
    start shortest first; the results come back in the prompts' order. Progress and ETA go to stderr."""
    blank_line = BlankLineStop(tokenizer, model.config.vocab_size) if stop_at_blank_line else None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    start, done = time.time(), []

    def progress(i):
        done.append(i)
        if len(done) % batch_size == 0 or len(done) == len(prompts):
            rate = len(done) / (time.time() - start)
            eta = timedelta(seconds=round((len(prompts) - len(done)) / rate))
            print(f"decoded {len(done)}/{len(prompts)} prompts | {rate:.2f} prompts/s | ETA {eta}", file=sys.stderr)

    decode = greedy_search if config.num_beams == 1 else beam_search
    tokens = decode(model, [prompts[i] for i in order], eos_token_id, config, blank_line, batch_size, progress)
    texts = dict(zip(order, (BLANK_LINE.split(tokenizer.decode(ids), maxsplit=1)[0].strip() for ids in tokens)))
    return [texts[i] for i in range(len(prompts))]

# ============================================= E2E evaluation: decode every test MR, write the official formats, score


def evaluate_e2e(model, tokenizer, groups: list[tuple[str, list[str]]], eos_token_id, out_dir,
                 beam: BeamSearchConfig = BeamSearchConfig(), batch_size: int = 8) -> dict:
    """Beam-search one output per unique MR (`groups`: data.e2e_test_groups), write
    predictions.txt and references.txt in the e2e-metrics formats, return the five metrics. The
    caller merges the adapter first, so decoding runs at the base model's speed."""
    out_dir = Path(out_dir)
    prompts = [encode_e2e_context(tokenizer, mr, eos_token_id) for mr, _ in groups]
    hyps = generate_texts(model, tokenizer, prompts, eos_token_id, beam, batch_size)
    write_hypotheses(out_dir / "predictions.txt", hyps)
    write_multi_references(out_dir / "references.txt", [refs for _, refs in groups])
    return {**e2e_metrics(hyps, [refs for _, refs in groups]), "eval_mrs": len(groups)}


def e2e_evaluator(config, tokenizer):
    """The E2E evaluation of a run, the one both train.py and `eval.py --checkpoint` run. Reads the
    test set now (a bad file stops a run before it trains) and returns evaluate(merged model in eval
    mode, out_dir) -> metrics: it decodes with the run's beam settings under the autocast train.py
    trains with, writes predictions.txt and references.txt into out_dir, and scores them."""
    groups = e2e_test_groups(setting(config, "data_version"), setting(config, "data_dir"),
                             setting(config, "max_eval_examples"))
    beam = BeamSearchConfig(**{name: setting(config, name) for name in
                               ("num_beams", "max_new_tokens", "length_penalty", "no_repeat_ngram_size")})

    def evaluate(model, out_dir) -> dict:
        device_type = model.lm_head.weight.device.type
        amp_dtype, _ = run_precision(setting(config, "dtype"), device_type, setting(config, "method"))
        eos_id, _ = eos_and_pad_ids(model.config)
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return evaluate_e2e(model, tokenizer, groups, eos_id, out_dir, beam, setting(config, "eval_batch_size"))
    return evaluate


def evaluate_run(run_dir, task: str = "e2e") -> dict:
    """`python eval.py --checkpoint RUN_DIR`: decode and score with the run's own settings, write predictions.txt,
    references.txt and metrics.json (the scores replace the run's; its other entries, e.g. train_steps, stay)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run_dir = check_run_dir(run_dir)
    model, tokenizer, config = load_run(run_dir, device, task)
    if tokenizer is None:
        raise CheckpointError(f"the run's model {config['model']!r} ships no tokenizer; E2E decoding needs one")
    evaluate = e2e_evaluator(config, tokenizer)
    print(f"decoding the E2E test set with {run_dir}: {config['num_beams']} beams, "
          f"at most {config['max_new_tokens']} new tokens, on {device}", file=sys.stderr)
    metrics = evaluate(model, run_dir)
    update_run_metrics(run_dir, metrics)
    print(json.dumps(metrics, indent=2))
    return metrics

# ============================================= command line


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score E2E NLG outputs with the official metrics, decode and "
                                                 "score a train.py run, or redraw a run's plots.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--refs", help="references: UTF-8 text with one group of lines per output, groups separated "
                                     "by a blank line, or an E2E CSV with mr,ref columns; needs --hyps (default: none)")
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
    scores = score_files(args.refs, args.hyps)
    print(json.dumps(scores, indent=2))
    return scores


if __name__ == "__main__":
    run_cli(main)
