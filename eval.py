"""Generation and task metrics for KaSA experiments.

    python eval.py --refs REFS --hyps HYPS      # prints the E2E metrics as JSON
    python eval.py --plots RUN_DIR              # redraws a training run's PNGs (needs matplotlib)

Metrics: the five scores of the official E2E NLG Challenge scorer (tuetschek/e2e-metrics,
measure_scores.py), re-implemented here so that they agree with it:
  BLEU, NIST  as mteval-v13a-sig.pl computes them (the scorer's default, Perl), with its tokeniser;
  METEOR      by the METEOR 1.5 jar (PyPI pycocoevalcap ships it), fed PTB-tokenised text;
  ROUGE-L     and CIDEr as the scorer's copy of pycocoevalcap computes them on PTB-tokenised text.
All scores are on the official scale: BLEU 0-1 (0.6925, not 69.25), NIST ~8.7, CIDEr ~2.4.
GLUE: accuracy, F1, Matthews, Pearson and Spearman correlation, as GLUE picks them per task.
"""
import argparse
import functools
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F

from data import encode_e2e_context, group_references, load_e2e_split

# =============================================================================
# Generation: batched beam search (and greedy decoding) with a KV cache
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
# With num_beams=1, `generate_texts` decodes greedily instead (transformers' num_beams=1): one row
# per prompt, the most likely allowed token, until it ends the text. Both decoders share the two
# rules, the n-gram ban and the end of text, and keep the batch full: a prompt that is done hands
# its rows to the next waiting one (`PromptBatch`), so late steps do not run nearly empty.
#
# One deliberate difference: a repeated n-gram is looked for in the continuation only, as the LoRA
# and fairseq decoders do. transformers also looks in the prompt, which on E2E forbids copying a
# 4-token slot value from the MR (" Crowne Plaza Hotel", " 5 out of 5"): 92% of the test set's
# references do that.


@dataclass(frozen=True)
class BeamSearchConfig:
    """Decoding settings; the defaults are the LoRA paper's E2E setting."""
    num_beams: int = 10  # 1: greedy decoding
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


def ending_tokens(is_eos, blank_line, line_open, at_limit):
    """(R, V): which next token ends each row's text: eos, a blank line, or any token at the length
    limit (at_limit (R,) bool: the row's next token is its max_new_tokens-th)."""
    ends = is_eos | at_limit[:, None]
    return ends | blank_line.ending_tokens(line_open) if blank_line is not None else ends


def block_repeated_ngrams(scores, generated, lengths, n: int) -> None:
    """Set to -inf, in place, every token that would repeat an n-gram of its row's continuation.

    scores (R, V); generated (R, L) holds each row's tokens, lengths (R,) how many so far. The
    n-grams seen are generated[r, i : i + n] for i = 0 .. lengths[r] - n; a token is banned where
    its row's last n - 1 tokens equal the first n - 1 of a seen n-gram, and it equals that n-gram's
    last token. No host sync: the bans are a scatter of min(score, -inf or +inf).
    """
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


def check_decoding(model, prompts, config: BeamSearchConfig, eos_token_id):
    """Validate the inputs of a decoder; return its eos id(s) as a (V,) bool table."""
    if model.training:
        raise ValueError("decoding needs the model in eval mode (dropout would make it random): "
                         "call model.eval() first")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("decoding needs a non-empty list of non-empty prompts")
    width = max(len(p) for p in prompts)
    if model.pos_emb is not None and width + config.max_new_tokens > model.config.max_position:
        raise ValueError(f"a prompt of {width} tokens + max_new_tokens={config.max_new_tokens} exceeds the "
                         f"model's {model.config.max_position} positions; shorten the prompt or lower max_new_tokens")
    eos_ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=model.lm_head.weight.device)
    is_eos[eos_ids] = True
    return is_eos


class PromptBatch:
    """Continuous batching: up to `max_prompts` prompts in flight in slots of `rows_per_prompt`
    cache rows (a prompt's beams); when a prompt is done, the next waiting one starts in its rows.

    Every row feeds one token per step, at its own position (the KV cache is filled row by row),
    so each prompt is decoded as it would be alone (up to the float rounding of other batch
    shapes). A prompt starts with a prefill of all
    its tokens but the last in a cache of its own, copied into its rows; its last token goes with
    the next shared step, whose logits are then its first.
    """

    def __init__(self, model, prompts, rows_per_prompt: int, max_prompts: int, max_new_tokens: int):
        self.model, self.prompts, self.K = model, prompts, rows_per_prompt
        self.device = model.lm_head.weight.device
        self.waiting = list(range(len(prompts)))[::-1]  # pop() gives the next prompt
        slots = min(max_prompts, len(prompts))
        self.cache = model.new_cache(slots * self.K, max(len(p) for p in prompts) + max_new_tokens)
        self.prompt_ids = [-1] * slots  # which prompt each slot holds
        self.prefilled = [0] * slots  # its prefilled length: cache positions its rows all share
        self.tokens = torch.zeros(slots * self.K, dtype=torch.long, device=self.device)  # each row's next input

    @property
    def num_slots(self) -> int:
        return len(self.prompt_ids)

    def rows(self, slots) -> torch.Tensor:
        """The cache rows of `slots`, slot-major."""
        return (torch.as_tensor(slots, dtype=torch.long, device=self.device)[:, None] * self.K
                + torch.arange(self.K, device=self.device)).flatten()

    def step(self):
        """(rows, d_model): the final hidden state after each row's next token."""
        return self.model.hidden_states(self.tokens[:, None], cache=self.cache)[:, -1]

    def start(self, slots: list[int]) -> list[int]:
        """Start the next waiting prompts in free `slots`, as many as are waiting; return the slots started."""
        slots = slots[:len(self.waiting)]
        if not slots:
            return slots
        new = [self.waiting.pop() for _ in slots]
        heads = [self.prompts[i][:-1] for i in new]
        width = max(len(h) for h in heads)
        prefill = None
        if width:  # right padding: under causal attention a prompt never sees the padding after it
            prefill = self.model.new_cache(len(new), width)
            self.model.hidden_states(torch.tensor([h + [0] * (width - len(h)) for h in heads], device=self.device),
                                     cache=prefill)
        rows, each = self.rows(slots), torch.arange(len(new), device=self.device).repeat_interleave(self.K)
        self.cache.start_rows(rows, torch.tensor([len(h) for h in heads], device=self.device)[each], prefill, each)
        self.tokens[rows] = torch.tensor([self.prompts[i][-1] for i in new], device=self.device)[each]
        for slot, i, head in zip(slots, new, heads):
            self.prompt_ids[slot], self.prefilled[slot] = i, len(head)
        return slots

    def finish(self, done: list[int], results: list, answer, on_done) -> list[int]:
        """results[prompt] = answer(slot) for every `done` slot; return those of them that no waiting
        prompt will take (to drop), the last ones."""
        for slot in done:
            results[self.prompt_ids[slot]] = answer(slot)
            if on_done is not None:
                on_done(self.prompt_ids[slot])
        return done[len(self.waiting):]

    def reorder(self, keep: list[int], rows, tokens) -> None:
        """Keep slots `keep`, in order; cache row i takes over row rows[i] (its parent beam's) and
        feeds tokens[i] next."""
        self.prompt_ids = [self.prompt_ids[s] for s in keep]
        self.prefilled = [self.prefilled[s] for s in keep]
        self.cache.reorder(rows, start=min(self.prefilled, default=0))
        self.tokens = tokens


@torch.inference_mode()
def greedy_search(model, prompts: list[list[int]], eos_token_id=None, config: BeamSearchConfig = BeamSearchConfig(),
                  blank_line: BlankLineStop | None = None, batch_size: int | None = None,
                  on_done=None) -> list[list[int]]:
    """Greedy decoding of every prompt (token id lists): at each step the most likely token that
    the n-gram rule allows, until the text ends. Returns each continuation, eos left out.

    batch_size prompts (default: all) are decoded at once, one row each; on_done(i) is called when
    prompt i is done. num_beams and length_penalty of `config` play no part.
    """
    cfg = config
    is_eos = check_decoding(model, prompts, cfg, eos_token_id)
    if blank_line is not None:
        blank_line.to(is_eos.device)
    batch = PromptBatch(model, prompts, 1, batch_size or len(prompts), cfg.max_new_tokens)
    S, device = batch.num_slots, is_eos.device
    generated = torch.zeros(S, cfg.max_new_tokens, dtype=torch.long, device=device)
    steps = torch.zeros(S, dtype=torch.long, device=device)  # tokens generated so far
    line_open = torch.zeros(S, dtype=torch.bool, device=device)
    results = [None] * len(prompts)
    batch.start(list(range(S)))
    while batch.num_slots:
        logits = model.lm_head(batch.step()).float()
        block_repeated_ngrams(logits, generated, steps, cfg.no_repeat_ngram_size)
        tokens = logits.argmax(-1)
        rows = torch.arange(len(tokens), device=device)
        ends = ending_tokens(is_eos, blank_line, line_open, steps == cfg.max_new_tokens - 1)[rows, tokens]
        generated[rows, steps] = tokens
        steps += (~is_eos[tokens]).long()  # an eos is not part of the answer
        if blank_line is not None:
            line_open = blank_line.advance(line_open, tokens)
        batch.tokens = tokens
        done = ends.nonzero().flatten().tolist()  # the one host sync of a step
        if not done:
            continue
        dropped = batch.finish(done, results, lambda s: generated[s, :steps[s]].tolist(), on_done)
        keep = [s for s in range(batch.num_slots) if s not in dropped]
        if dropped:  # no prompt waits for these slots
            batch.reorder(keep, torch.tensor(keep, dtype=torch.long, device=device), tokens[keep])
            generated, steps, line_open = generated[keep], steps[keep], line_open[keep]
        started = batch.start([keep.index(s) for s in done if s not in dropped])
        steps[started], line_open[started] = 0, False
    return results


def top_pairs(running, logits, log_norm, K: int):
    """The K best (beam, token) pairs of every prompt by s_b + log p(t | b) (steps 1-3), as
    (scores, parent beams, tokens), each (prompts, K). A prompt's K best pairs are among the K best
    tokens of each of its beams, so only those K*K pairs are ranked, not K*V.
    running (prompts, K); logits (prompts*K, V), whose log-probs are logits - log_norm."""
    values, tokens = logits.topk(K, dim=-1)
    scores = (running.reshape(-1, 1) + (values - log_norm)).view(-1, K * K)
    scores, pairs = scores.topk(K, dim=1)
    return scores, pairs // K, tokens.view(-1, K * K).gather(1, pairs)


@torch.inference_mode()
def beam_search(model, prompts: list[list[int]], eos_token_id=None, config: BeamSearchConfig = BeamSearchConfig(),
                blank_line: BlankLineStop | None = None, batch_size: int | None = None,
                on_done=None) -> list[list[int]]:
    """Beam-search every prompt (token id lists); return each one's best continuation.

    eos_token_id: an id or a list of ids that end a hypothesis; they are left out of the result.
    blank_line: also end a hypothesis when its text completes a blank line (that token is kept).
    batch_size prompts (default: all) are searched at once, num_beams rows each; on_done(i) is
    called when prompt i is done.
    """
    cfg, K, V = config, config.num_beams, model.config.vocab_size
    is_eos = check_decoding(model, prompts, cfg, eos_token_id)
    if blank_line is not None:
        blank_line.to(is_eos.device)
    batch = PromptBatch(model, prompts, K, batch_size or len(prompts), cfg.max_new_tokens)
    S, device = batch.num_slots, is_eos.device
    running = torch.full((S, K), -math.inf, device=device)  # s_b of every running beam
    finished = torch.full((S, K), -math.inf, device=device)  # the K best finished scores, best first
    steps = torch.zeros(S, dtype=torch.long, device=device)  # tokens generated so far
    generated = torch.zeros(S * K, cfg.max_new_tokens, dtype=torch.long, device=device)
    line_open = torch.zeros(S * K, dtype=torch.bool, device=device)
    best = torch.zeros(S, cfg.max_new_tokens, dtype=torch.long, device=device)  # the best finished hypothesis
    best_length = torch.zeros(S, dtype=torch.long, device=device)
    results = [None] * len(prompts)

    def restart(slots):
        running[slots] = -math.inf
        running[slots, 0] = 0.0  # the K copies are identical: only one may spawn continuations at first
        finished[slots], steps[slots], line_open[batch.rows(slots)] = -math.inf, 0, False

    restart(batch.start(list(range(S))))
    while batch.num_slots:
        n = batch.num_slots
        slot_rows = torch.arange(n, device=device)[:, None] * K
        logits = model.lm_head(batch.step()).float()  # (n * K, V), fp32 sums
        log_norm = logits.logsumexp(-1, keepdim=True)  # of the model's distribution, before the ban
        block_repeated_ngrams(logits, generated, steps.repeat_interleave(K), cfg.no_repeat_ngram_size)
        ends = ending_tokens(is_eos, blank_line, line_open, (steps == cfg.max_new_tokens - 1).repeat_interleave(K))

        # Finished hypotheses: the pairs among the K best that end here (step 2).
        top_scores, top_parents, top_tokens = top_pairs(running, logits, log_norm, K)
        length_norm = (steps + 1)[:, None].float() ** cfg.length_penalty
        candidates = torch.where(ends[slot_rows + top_parents, top_tokens], top_scores / length_norm, -math.inf)
        improves = candidates.max(1).values > finished[:, 0]
        finished = torch.cat([finished, candidates], 1).topk(K, dim=1).values
        pick = candidates.argmax(1, keepdim=True)
        token = top_tokens.gather(1, pick)[:, 0]
        hypothesis = generated[(slot_rows + top_parents.gather(1, pick))[:, 0]]
        hypothesis[torch.arange(n, device=device), steps] = token
        best = torch.where(improves[:, None], hypothesis, best)
        best_length = torch.where(improves, steps + (~is_eos[token]).long(), best_length)

        # Running beams: the K best pairs that do not end (step 3); a prompt is done by step 4.
        running, parents, tokens = top_pairs(running, logits.masked_fill_(ends, -math.inf), log_norm, K)
        done = (finished[:, -1] >= running[:, 0] / length_norm[:, 0]) | (steps == cfg.max_new_tokens - 1)
        rows, tokens = (slot_rows + parents).flatten(), tokens.flatten()
        generated = generated[rows]
        generated[torch.arange(n * K, device=device), steps.repeat_interleave(K)] = tokens
        if blank_line is not None:
            line_open = blank_line.advance(line_open[rows], tokens)
        steps += 1
        done = done.nonzero().flatten().tolist()  # the one host sync of a step
        dropped = batch.finish(done, results, lambda s: best[s, :best_length[s]].tolist(), on_done)
        keep = [s for s in range(n) if s not in dropped]
        if dropped:  # no prompt waits for these slots
            rows, kept_rows = rows.view(n, K)[keep].flatten(), batch.rows(keep)
            running, finished, steps, best, best_length = (t[keep] for t in (running, finished, steps, best, best_length))
            generated, line_open, tokens = generated[kept_rows], line_open[kept_rows], tokens[kept_rows]
        batch.reorder(keep, rows, tokens)  # each beam's cache rows follow its parent
        restart(batch.start([keep.index(s) for s in done if s not in dropped]))
    return results


def generate_texts(model, tokenizer, prompts: list[list[int]], eos_token_id=None,
                   config: BeamSearchConfig = BeamSearchConfig(), batch_size: int = 8,
                   stop_at_blank_line: bool = True) -> list[str]:
    """Decode every prompt (beam search, or greedy with num_beams=1), `batch_size` prompts in flight,
    and return the decoded continuations, each cut at its first blank line and stripped. Prompts
    start shortest first; the results come back in the prompts' order. Progress and ETA go to stderr."""
    blank_line = BlankLineStop(tokenizer, model.config.vocab_size) if stop_at_blank_line else None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    start, done = time.time(), 0

    def progress(_):
        nonlocal done
        done += 1
        if done % batch_size == 0 or done == len(prompts):
            rate = done / (time.time() - start)
            eta = timedelta(seconds=round((len(prompts) - done) / rate))
            print(f"decoded {done}/{len(prompts)} prompts | {rate:.2f} prompts/s | ETA {eta}", file=sys.stderr, flush=True)

    decode = greedy_search if config.num_beams == 1 else beam_search
    tokens = decode(model, [prompts[i] for i in order], eos_token_id, config, blank_line, batch_size, progress)
    texts = [""] * len(prompts)
    for i, ids in zip(order, tokens):
        texts[i] = BLANK_LINE.split(tokenizer.decode(ids), maxsplit=1)[0].strip()
    return texts


# =============================================================================
# Metrics
# =============================================================================

# -----------------------------------------------------------------------------
# Tokenisers

# mteval-v13a `tokenization` (non-international): punctuation and symbols become tokens, except
# '.' and ',' inside numbers, and '-' unless it follows a digit. Lowercasing is ASCII-only (tr/A-Z/).
_MTEVAL_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def tokenize_mteval(text: str) -> list[str]:
    """Tokens as mteval-v13a-sig.pl sees them (BLEU and NIST)."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} ".translate(_ASCII_LOWER)
    for pattern, replacement in _MTEVAL_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


# The COCO scorers run Stanford CoreNLP 3.4.1's PTBTokenizer (-preserveLines -lowerCase), then drop
# the tokens in pycocoevalcap's PUNCTUATIONS list (compared after lowercasing, so the bracket
# tokens -lrb- and -rrb- survive). This regex reproduces that tokeniser on English restaurant text:
# it matches the jar token for token on all 9,031 distinct references of the E2E dev and test sets
# (original and cleaned).
# A word piece: a number (30.99, 1,000, 3:30, .5), letters joined across . ! ? ("near.It" stays
# one token, as PTB's WORD does), or letters and digits ("1st"). A thing: pieces joined by hyphens,
# each optionally after d' o' l' ("O'Brien", "family-friendly", "20-25").
_PTB_PIECE = r"(?:\d*(?:[.,:]\d+)+|[^\W\d_][^\W_]*(?:[.!?][^\W\d_][^\W_]*)*|[^\W_]+)"
_PTB_THING = rf"(?:(?i:[dol])['’](?=[^\W_]))?{_PTB_PIECE}(?:[-‐‑](?:(?i:[dol])['’](?=[^\W_]))?{_PTB_PIECE})*"
_PTB_TOKEN = re.compile(rf"""
      (?<![^\W_])[-+]\d*(?:[.,:]\d+)+ | (?<![^\W_])[-+]\d+   # signed numbers after a space: -25
    | [^\W\d_](?:\.[^\W\d_])+\.(?![^\W_])                    # acronyms: u.s., e.g., p.m.
    | (?i:mr|mrs|ms|dr|st|jr|sr|prof|mt|vs|etc|inc|ltd|co)\.(?!\S)   # titles keep their period
    | [^\W_]+(?:-[^\W\d_]+){{0,2}}(?:/[^\W_]+(?:-[^\W\d_]+){{0,2}}){{1,2}}  # slashes: and/or, 5/5
    | (?<![^\W_])(?:n['’]t|['’](?i:s|re|ve|ll|d|m))(?![^\W_])  # clitics already apart: "it 's"
    | {_PTB_THING}(?:n['’]t|['’](?i:s|re|ve|ll|d|m))(?![^\W_])  # clitic to split: don't, it's
    | [^\W\d_]+[aeiouyAEIOUY]['’][aeiouA-Z][^\W\d_]*         # vowel'vowel words: ma'am, e'er
    | {_PTB_THING}\.(?=[,;:])                                # PTB keeps a period before ,;:
    | {_PTB_THING}
    | ['’](?i:n['’]?|em|cause|till?|tis|twas|[2-9]0s)(?![^\W_])  # 'n' 'em 'cause '90s 'tis
    | \.\.\. | -- | [?!]+                                     # multi-character punctuation
    | \S                                                     # any other symbol
""", re.VERBOSE)
_PTB_CLITIC = re.compile(r"(?i)^(.*?)(n['’]t|['’](?:s|re|ve|ll|d|m))$")  # don't -> do n't
# PTB splits a few fused words ("splitAssimilations").
_PTB_FUSED = re.compile(r"(?i)^(can)(not)$|^(gon|got|wan)(na|ta)$|^(lem|gim)(me)$|^('t)(is|was)$")
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# PTB's normalizeCurrency: the pound becomes '#', cents 'cents', the euro and generic currency '$'.
_PTB_CURRENCY = str.maketrans({"£": " # ", "¢": " cents ", "€": " $ ", "¤": " $ "})
# pycocoevalcap removes its PUNCTUATIONS after tokenising; -LRB- and the like never match the
# lowercased tokens. PTB writes every kind of quote (straight, curly, guillemet) as `` '' ` ' and
# dashes and … as -- and ..., all removed; the raw characters stand in for them here.
_COCO_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";",
                     '"', "“", "”", "‘", "’", "‛", "«", "»", "‹", "›", "–", "—", "―", "‐", "‑", "‒", "…"}


def tokenize_ptb(text: str) -> list[str]:
    """Tokens as the COCO scorers (METEOR, ROUGE-L, CIDEr) see them, lowercased, punctuation gone."""
    return [token for chunk in text.translate(_PTB_CURRENCY).split() for token in _ptb_chunk(chunk)]


@functools.lru_cache(maxsize=1 << 16)
def _ptb_chunk(chunk: str) -> tuple[str, ...]:
    # No rule joins or looks across whitespace, so each whitespace-free chunk is tokenised once.
    tokens = []
    for token in _PTB_TOKEN.findall(chunk):
        split = _PTB_CLITIC.match(token) or _PTB_FUSED.match(token)
        if split:  # clitics are written with a straight apostrophe
            tokens += [part.replace("’", "'") for part in split.groups() if part]
        else:
            tokens.append(_PTB_BRACKETS.get(token, token))
    return tuple(t for t in (t.lower() for t in tokens) if t not in _COCO_PUNCTUATION)


def ngram_counts(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _check_pairs(hyps, refs):
    if not hyps:
        raise ValueError("no hypotheses to score")
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference groups; they must be "
                         "in the same order, one group per hypothesis")
    if any(len(group) == 0 for group in refs):
        raise ValueError("a reference group is empty; every hypothesis needs at least one reference")


# -----------------------------------------------------------------------------
# BLEU and NIST (mteval-v13a-sig.pl, as e2e-metrics calls it)


def _clipped_matches(hyp, refs, n):
    """n-gram matches clipped by the max count in any one reference (mteval score_segment)."""
    ref_max = Counter()
    for ref in refs:
        ref_max |= ngram_counts(ref, n)
    return {g: min(c, ref_max[g]) for g, c in ngram_counts(hyp, n).items() if g in ref_max}


def bleu_score(hyps: list[str], refs: list[list[str]], max_n: int = 4) -> float:
    """Corpus BLEU of mteval-v13a: clipped n-gram precisions summed over the corpus, brevity
    penalty from the reference closest in length to each hypothesis (ties: the shorter), and the
    script's smoothing of zero-match orders (1/2^k for the k-th such order)."""
    _check_pairs(hyps, refs)
    matches, totals, hyp_len, ref_len = [0] * max_n, [0] * max_n, 0, 0
    for hyp, group in zip(hyps, refs):
        hyp_tokens = tokenize_mteval(hyp)
        ref_tokens = [tokenize_mteval(r) for r in group]
        for n in range(1, max_n + 1):
            matches[n - 1] += sum(_clipped_matches(hyp_tokens, ref_tokens, n).values())
            totals[n - 1] += max(len(hyp_tokens) - n + 1, 0)
        hyp_len += len(hyp_tokens)
        ref_len += min((len(r) for r in ref_tokens), key=lambda l: (abs(l - len(hyp_tokens)), l))
    if hyp_len == 0:
        return 0.0
    log_precision, smooth = 0.0, 1
    for match, total in zip(matches, totals):
        if total == 0:
            continue  # mteval adds log(1): an order with no hypothesis n-grams does not count
        if match == 0:
            smooth *= 2
            log_precision += math.log(1 / (smooth * total))
        else:
            log_precision += math.log(match / total)
    brevity_penalty = math.exp(min(0.0, 1 - ref_len / hyp_len))
    return brevity_penalty * math.exp(log_precision / max_n)


def nist_score(hyps: list[str], refs: list[list[str]], max_n: int = 5) -> float:
    """Corpus NIST of mteval-v13a-sig.pl (Doddington 2002).

    Info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)), counted over all references of the
    corpus (for unigrams, the numerator is the total number of reference words). Score = sum over
    n of (info of clipped matches / hypothesis n-grams), times the length penalty
    exp(-beta log^2 min(1, L_hyp / L_ref)) with beta so that ratio 2/3 gives 0.5. As in the e2e
    edit of the script, L_ref = total reference words / mean number of references per segment.
    """
    _check_pairs(hyps, refs)
    ref_tokens = [[tokenize_mteval(r) for r in group] for group in refs]
    corpus_counts = Counter()
    total_ref_words = 0
    for group in ref_tokens:
        for ref in group:
            total_ref_words += len(ref)
            for n in range(1, max_n + 1):
                corpus_counts.update(ngram_counts(ref, n))

    def info(gram):
        prefix_count = corpus_counts[gram[:-1]] if len(gram) > 1 else total_ref_words
        return math.log2(prefix_count / corpus_counts[gram])

    info_sums, totals, hyp_len = [0.0] * max_n, [0] * max_n, 0
    for hyp, group in zip(hyps, ref_tokens):
        hyp_tokens = tokenize_mteval(hyp)
        hyp_len += len(hyp_tokens)
        for n in range(1, max_n + 1):
            clipped = _clipped_matches(hyp_tokens, group, n)
            info_sums[n - 1] += sum(info(g) * c for g, c in clipped.items())
            totals[n - 1] += max(len(hyp_tokens) - n + 1, 0)
    score = sum(s / max(t, 1) for s, t in zip(info_sums, totals))
    mean_refs_per_segment = sum(len(group) for group in refs) / len(refs)
    ratio = hyp_len / (total_ref_words / mean_refs_per_segment)
    beta = -math.log(0.5) / math.log(1.5) ** 2
    penalty = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-beta * math.log(ratio) ** 2)
    return score * penalty


# -----------------------------------------------------------------------------
# ROUGE-L and CIDEr (pycocoevalcap as bundled with e2e-metrics, on PTB tokens)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_score(hyps: list[str], refs: list[list[str]], beta: float = 1.2) -> float:
    """Mean over segments of ROUGE-L F (Lin 2004) from the best precision and the best recall
    over the references, weighted by beta=1.2 (pycocoevalcap rouge.py)."""
    _check_pairs(hyps, refs)
    scores = []
    for hyp, group in zip(hyps, refs):
        hyp_tokens = tokenize_ptb(hyp)
        if not hyp_tokens:
            scores.append(0.0)
            continue
        lcs = [(lcs_length(r, hyp_tokens), len(r)) for r in (tokenize_ptb(r) for r in group)]
        precision = max(l / len(hyp_tokens) for l, _ in lcs)
        recall = max(l / max(ref_len, 1) for l, ref_len in lcs)
        if precision == 0 or recall == 0:
            scores.append(0.0)
        else:
            scores.append((1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision))
    return sum(scores) / len(scores)


def cider_score(hyps: list[str], refs: list[list[str]], max_n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr as e2e-metrics' pycocoevalcap computes it (Vedantam et al. 2015, the CIDEr-D variant):
    tf-idf n-gram vectors (document frequency = number of segments whose references contain the
    n-gram), hypothesis weights clipped at the reference's, Gaussian length penalty, mean over
    n = 1..4 and references, times 10. Faithful to the official code, the length compared in the
    penalty is the number of bigrams (its `length` counts n-grams of index n == 1)."""
    _check_pairs(hyps, refs)
    hyp_counts = [_all_ngram_counts(tokenize_ptb(h), max_n) for h in hyps]
    ref_counts = [[_all_ngram_counts(tokenize_ptb(r), max_n) for r in group] for group in refs]
    document_frequency = Counter()
    for group in ref_counts:
        document_frequency.update({g for counts in group for g in counts})
    log_num_docs = math.log(len(refs))

    def tfidf(counts):
        vectors = [{} for _ in range(max_n)]
        for gram, tf in counts.items():
            vectors[len(gram) - 1][gram] = tf * (log_num_docs - math.log(max(1.0, document_frequency[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vectors]
        bigram_count = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vectors, norms, bigram_count

    scores = []
    for hyp, group in zip(hyp_counts, ref_counts):
        hyp_vec, hyp_norm, hyp_len = tfidf(hyp)
        total = 0.0
        for ref in group:
            ref_vec, ref_norm, ref_len = tfidf(ref)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma ** 2))
            for n in range(max_n):
                dot = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0)
                          for g, w in hyp_vec[n].items())
                if hyp_norm[n] != 0 and ref_norm[n] != 0:
                    dot /= hyp_norm[n] * ref_norm[n]
                total += dot * penalty
        scores.append(10.0 * total / max_n / len(group))
    return sum(scores) / len(scores)


def _all_ngram_counts(tokens, max_n):
    counts = Counter()
    for n in range(1, max_n + 1):
        counts.update(ngram_counts(tokens, n))
    return counts


# -----------------------------------------------------------------------------
# METEOR (the METEOR 1.5 jar, driven as pycocoevalcap's meteor.py drives it)

METEOR_FIX = ("METEOR needs Java (8 or newer) on PATH and the METEOR 1.5 jar from PyPI's "
              "pycocoevalcap: `pip install pycocoevalcap` (or set KASA_METEOR_JAR to meteor-1.5.jar)")


def find_meteor_jar() -> Path | None:
    """meteor-1.5.jar from KASA_METEOR_JAR or the installed pycocoevalcap (not imported)."""
    if os.environ.get("KASA_METEOR_JAR"):
        jar = Path(os.environ["KASA_METEOR_JAR"])
        return jar if jar.is_file() else None
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        jar = Path(location) / "meteor" / "meteor-1.5.jar"
        if jar.is_file():
            return jar
    return None


def meteor_score(hyps: list[str], refs: list[list[str]]) -> float | None:
    """Corpus METEOR 1.5 (-l en -norm) on PTB tokens; None (with a warning) if Java or the jar
    is missing. Each segment's statistics come from a SCORE line; one EVAL line over all of them
    gives per-segment scores and then the corpus score, which is what e2e-metrics reports."""
    _check_pairs(hyps, refs)
    jar, java = find_meteor_jar(), shutil.which("java")
    if jar is None or java is None:
        print(f"warning: METEOR unavailable ({'no java' if java is None else 'no jar'}). {METEOR_FIX}",
              file=sys.stderr)
        return None
    command = [java, "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    with subprocess.Popen(command, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, encoding="utf-8") as meteor:
        def ask(line):
            meteor.stdin.write(line + "\n")
            meteor.stdin.flush()
            return meteor.stdout.readline().strip()

        stats = []
        for hyp, group in zip(hyps, refs):
            # "|||" separates fields in the jar's protocol, so it is removed from the hypothesis.
            hyp_text = " ".join(tokenize_ptb(hyp)).replace("|||", "").replace("  ", " ")
            ref_texts = [" ".join(tokenize_ptb(r)) for r in group]
            stats.append(ask(" ||| ".join(["SCORE", *ref_texts, hyp_text])))
        ask(" ||| ".join(["EVAL", *stats]))  # first reply line: the first segment's score
        for _ in range(len(stats) - 1):
            meteor.stdout.readline()
        corpus = float(meteor.stdout.readline().strip())
        meteor.stdin.close()
    return corpus


# -----------------------------------------------------------------------------
# All five


def e2e_metrics(hyps: list[str], refs: list[list[str]]) -> dict[str, float | None]:
    """The official E2E scorer's five metrics; METEOR is None when it cannot run."""
    return {
        "BLEU": bleu_score(hyps, refs),
        "NIST": nist_score(hyps, refs),
        "METEOR": meteor_score(hyps, refs),
        "ROUGE_L": rouge_l_score(hyps, refs),
        "CIDEr": cider_score(hyps, refs),
    }


# -----------------------------------------------------------------------------
# GLUE metrics: the benchmark's own choice per task, on the 0-1 scale (the paper reports x100).
# Where a score is undefined (a constant prediction or label has no correlation) it is 0, as
# sklearn's matthews_corrcoef returns, so that "best epoch" stays comparable; scipy gives NaN.


def _check_predictions(predictions, labels):
    if len(predictions) == 0 or len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions and {len(labels)} labels; "
                         "need one prediction per label, and at least one")


def accuracy(predictions, labels) -> float:
    _check_predictions(predictions, labels)
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def f1_score(predictions, labels, positive=1) -> float:
    """F1 of the positive class (MRPC: 1 = paraphrase) = 2TP / (2TP + FP + FN); 0 if no positives."""
    _check_predictions(predictions, labels)
    true_pos = sum(p == positive and y == positive for p, y in zip(predictions, labels))
    wrong = sum((p == positive) != (y == positive) for p, y in zip(predictions, labels))  # FP + FN
    return 2 * true_pos / (2 * true_pos + wrong) if true_pos + wrong else 0.0


def matthews_correlation(predictions, labels) -> float:
    """Matthews correlation from the confusion counts (the K-class form, which is the usual
    (TP*TN - FP*FN) / sqrt(...) for two classes): (n*correct - sum_k p_k t_k) /
    sqrt((n^2 - sum_k p_k^2)(n^2 - sum_k t_k^2)), p_k / t_k = predicted / true count of class k."""
    _check_predictions(predictions, labels)
    n, correct = len(labels), sum(p == y for p, y in zip(predictions, labels))
    predicted, true = Counter(predictions), Counter(labels)
    covariance = n * correct - sum(predicted[k] * true[k] for k in true)
    variance_pred = n * n - sum(c * c for c in predicted.values())
    variance_true = n * n - sum(c * c for c in true.values())
    if variance_pred == 0 or variance_true == 0:
        return 0.0
    return covariance / math.sqrt(variance_pred * variance_true)


def pearson_correlation(x, y) -> float:
    _check_predictions(x, y)
    x, y = [float(v) for v in x], [float(v) for v in y]
    if len(set(x)) == 1 or len(set(y)) == 1:
        return 0.0
    mean_x, mean_y = math.fsum(x) / len(x), math.fsum(y) / len(y)
    dx, dy = [v - mean_x for v in x], [v - mean_y for v in y]
    covariance = math.fsum(a * b for a, b in zip(dx, dy))
    return covariance / math.sqrt(math.fsum(a * a for a in dx) * math.fsum(b * b for b in dy))


def average_ranks(values) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks, start = [0.0] * len(values), 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman_correlation(x, y) -> float:
    """Pearson correlation of the average ranks."""
    _check_predictions(x, y)
    return pearson_correlation(average_ranks(x), average_ranks(y))


GLUE_METRICS = {"cola": ("matthews",), "sst2": ("accuracy",), "mrpc": ("accuracy", "f1"),
                "qnli": ("accuracy",), "rte": ("accuracy",), "stsb": ("pearson", "spearman")}
_METRIC_FUNCTIONS = {"accuracy": accuracy, "f1": f1_score, "matthews": matthews_correlation,
                     "pearson": pearson_correlation, "spearman": spearman_correlation}


def glue_metrics(task: str, predictions, labels) -> dict[str, float]:
    """The task's GLUE metrics: predictions are class ids (STS-B: similarity scores), one per label."""
    if task not in GLUE_METRICS:
        raise ValueError(f"unknown GLUE task {task!r}; choose one of {sorted(GLUE_METRICS)}")
    return {name: _METRIC_FUNCTIONS[name](predictions, labels) for name in GLUE_METRICS[task]}


# =============================================================================
# File formats (as e2e-metrics reads them)
# =============================================================================


# e2e-metrics reads text with codecs.open, which ends a line at every Unicode line boundary
# (\r, \x85, \u2028, ...), as str.splitlines does; the writers fold those into spaces so that
# one output stays one line.


def _read_lines(path) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _one_line(text: str) -> str:
    return " ".join(text.splitlines()).strip()


def _write_text_atomic(path, text: str) -> None:
    temporary = Path(path).with_name(Path(path).name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def read_hypotheses(path) -> list[str]:
    """One system output per line."""
    return _read_lines(path)


def write_hypotheses(path, hyps: list[str]) -> None:
    _write_text_atomic(path, "".join(_one_line(hyp) + "\n" for hyp in hyps))


def read_multi_references(path) -> list[list[str]]:
    """Groups of reference lines separated by blank lines, one group per hypothesis."""
    groups = [[]]
    for line in _read_lines(path):
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
    return groups if groups[-1] else groups[:-1]


def write_multi_references(path, refs: list[list[str]]) -> None:
    _write_text_atomic(path, "\n\n".join("\n".join(map(_one_line, group)) for group in refs) + "\n")


def read_references(path) -> list[list[str]]:
    """References from multi-reference text, or from an E2E CSV (mr,ref) grouped by MR in order of
    first appearance. Text without any blank line holds one reference per output, as e2e-metrics
    reads it."""
    if Path(path).suffix.lower() == ".csv":
        return [group for _, group in group_references(load_e2e_split(path))]
    groups = read_multi_references(path)
    return [[ref] for ref in groups[0]] if len(groups) == 1 else groups


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


def load_run(run_dir, device="cpu"):
    """(model, tokenizer, config dict) of a finished training run: the pretrained model named in
    RUN_DIR/config.json with RUN_DIR/adapter.safetensors loaded and merged (no SVD is run)."""
    from safetensors.torch import load_file

    import kasa
    from model import load_pretrained
    run_dir = Path(run_dir)
    for name in ("config.json", "adapter.safetensors"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name} not found: is {run_dir} the --out-dir of a finished "
                                    "train.py run?")
    config = json.loads((run_dir / "config.json").read_text())
    model, tokenizer = load_pretrained(config["model"], device=device)
    kasa.load_kasa_state_dict(model, load_file(run_dir / "adapter.safetensors", device=str(device)))
    kasa.merge_kasa(model)
    return model.eval(), tokenizer, config


def evaluate_run(run_dir) -> dict:
    """`python eval.py --task e2e --checkpoint RUN_DIR`: decode and score with a run's own settings."""
    from data import eos_and_pad_ids, resolve_e2e_files
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, config = load_run(run_dir, device)
    eos_id, _ = eos_and_pad_ids(model.config)
    test = resolve_e2e_files(config["data_version"], config["data_dir"])["test"]
    groups = group_references(load_e2e_split(test))[:config["max_eval_examples"] or None]
    beam = BeamSearchConfig(config["num_beams"], config["max_new_tokens"], config["length_penalty"],
                            config["no_repeat_ngram_size"])
    metrics = evaluate_e2e(model, tokenizer, groups, eos_id, run_dir, beam, config["eval_batch_size"])
    print(json.dumps(metrics, indent=2))
    return metrics


# =============================================================================
# Plots of a training run (matplotlib is optional: without it, nothing is drawn)
# =============================================================================


def write_plots(run_dir) -> list[Path]:
    """Draw the PNGs of a training run into RUN_DIR/plots from the files the run left in RUN_DIR.

      loss_curves.png  task loss, L2 and L3 per step                    from history.json
      delta_sigma.png  the learned Δσ (kasa_sigma), layers × r          from adapter.safetensors
                       (the paper's figure 5)
      spectrum.png     kept vs dropped singular values of the layers
                       whose truncation cost the most loss              from truncation_report.json
    A plot whose input is missing is skipped with a one-line message. Returns the written paths.
    """
    try:
        from matplotlib.figure import Figure       # no pyplot: no GUI backend, no global state
    except ImportError:
        print("matplotlib is not installed: skipped the plots (loss curves, Δσ heat map, spectrum); "
              "`pip install matplotlib`, then `python eval.py --plots RUN_DIR` draws them")
        return []
    run_dir = Path(run_dir)
    written = []
    for name, source, draw in [("loss_curves.png", "history.json", _plot_loss_curves),
                               ("delta_sigma.png", "adapter.safetensors", _plot_delta_sigma),
                               ("spectrum.png", "truncation_report.json", _plot_spectrum)]:
        if not (run_dir / source).is_file():
            print(f"skipped {name}: {run_dir / source} does not exist")
            continue
        figure = Figure(layout="constrained")
        draw(figure, run_dir / source)
        path = run_dir / "plots" / name
        path.parent.mkdir(exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        figure.savefig(temporary, format="png", dpi=120)
        os.replace(temporary, path)
        written.append(path)
    return written


def _plot_loss_curves(figure, history_path: Path):
    import numpy as np
    history = json.loads(history_path.read_text())
    if not history:
        raise ValueError(f"{history_path} holds no steps: did the run train at all?")
    steps = np.array([entry["step"] for entry in history])
    figure.set_size_inches(13, 3.5)
    panels = [("loss", "task loss"), ("l2", r"$L_2 = \sum\,\|\Delta\sigma\|^2$"),
              ("l3", r"$L_3 = \sum\,\|B^\top B - I\|^2 + \|AA^\top - I\|^2$")]
    for axes, (key, title) in zip(figure.subplots(1, 3), panels):
        values = np.array([entry[key] for entry in history], dtype=float)
        window = len(values) // 50                 # per-step values are noisy: add a running mean
        axes.plot(steps, values, lw=0.8, alpha=0.35 if window > 1 else 1.0)
        if window > 1:
            axes.plot(steps[window - 1:], np.convolve(values, np.ones(window) / window, "valid"),
                      lw=1.5, color="tab:blue", label=f"mean of {window} steps")
            axes.legend()
        axes.set(title=title, xlabel="step")


def _plot_delta_sigma(figure, adapter_path: Path):
    """One heat map per projection kind (q_proj, v_proj, ...): a row per layer, a column per Δσ_i."""
    import numpy as np
    from safetensors import safe_open
    with safe_open(adapter_path, framework="numpy") as f:
        sigma = {key.removesuffix(".kasa_sigma"): f.get_tensor(key) for key in f.keys() if key.endswith(".kasa_sigma")}
    if not sigma:
        raise ValueError(f"{adapter_path} holds no '<layer>.kasa_sigma' tensors: is it a kasa_state_dict?")
    by_kind = {}
    for name in sorted(sigma, key=_layer_order):
        by_kind.setdefault(name.rpartition(".")[2], []).append(name)
    rows = max(len(names) for names in by_kind.values())
    r = max(len(values) for values in sigma.values())
    figure.set_size_inches(1.5 + len(by_kind) * (1.2 + 0.35 * r), 1.2 + 0.16 * rows)
    limit = max(float(np.abs(values).max()) for values in sigma.values())
    panels = figure.subplots(1, len(by_kind), squeeze=False)[0]
    for axes, (kind, names) in zip(panels, sorted(by_kind.items())):
        grid = np.full((len(names), r), np.nan)
        for row, name in enumerate(names):
            grid[row, :len(sigma[name])] = sigma[name]
        image = axes.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
        axes.set_yticks(range(len(names)), [_short_layer_name(name) for name in names], fontsize=7)
        axes.set_xticks(range(r), [str(i + 1) for i in range(r)])
        axes.set(title=rf"$\Delta\sigma$ of {kind}", xlabel="i")
    figure.colorbar(image, ax=panels, label=r"$\Delta\sigma_i$")


def _plot_spectrum(figure, report_path: Path, worst: int = 4):
    """The singular values of the layers that lost the most, kept (line) and dropped (dots)."""
    report = json.loads(report_path.read_text())
    rows = report["layers"][:worst]                # the report lists the worst layers first
    figure.set_size_inches(1 + 3.6 * len(rows), 3.4)
    figure.suptitle(f"loss {report['loss_original']:.3f} (original) -> {report['loss_truncated']:.3f} "
                    "(truncated); Δloss: this layer truncated alone")
    for axes, row in zip(figure.subplots(1, len(rows), squeeze=False)[0], rows):
        kept, dropped = row["kept_sigma"], row["dropped_sigma"]
        axes.semilogy(range(1, len(kept) + 1), kept, lw=1.2, label="kept (W_world)")
        axes.semilogy(range(len(kept) + 1, len(kept) + len(dropped) + 1), dropped, "o", ms=4,
                      color="tab:red", label=f"dropped ({len(dropped)}): {100 * row['energy_share']:.2g}% of ‖W‖²")
        axes.set(title=f"{_short_layer_name(row['name'])}: Δloss {row['delta_loss']:+.3f}", xlabel="i",
                 ylabel=r"$\sigma_i$")
        axes.legend(fontsize=8)


def _layer_order(name: str):
    """Block number first, so that blocks.10 comes after blocks.9."""
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    return (numbers[-1] if numbers else -1, name)


def _short_layer_name(name: str) -> str:
    """'blocks.12.attn.v_proj' -> '12.v_proj'."""
    numbers = [part for part in name.split(".") if part.isdigit()]
    return f"{numbers[-1]}.{name.rpartition('.')[2]}" if numbers else name


# =============================================================================
# Command line
# =============================================================================


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score E2E NLG outputs with the official metrics.")
    parser.add_argument("--refs",
                        help="references: text with one group of lines per output, groups "
                             "separated by a blank line; or an E2E CSV with mr,ref columns")
    parser.add_argument("--hyps", help="system outputs, one line per MR in the references' order")
    parser.add_argument("--checkpoint", metavar="RUN_DIR",
                        help="instead of reading --hyps, decode the test set with a train.py run's merged "
                             "adapter and score it (writes predictions.txt, references.txt, metrics.json there)")
    parser.add_argument("--task", default="e2e", choices=["e2e"], help="the task of --checkpoint")
    parser.add_argument("--plots", metavar="RUN_DIR",
                        help="instead of scoring, redraw a training run's PNGs into RUN_DIR/plots "
                             "(loss curves, Δσ heat map, kept vs dropped spectrum)")
    return parser


def main(argv=None) -> dict:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.plots:
        paths = write_plots(args.plots)
        for path in paths:
            print(f"wrote {path}")
        return {"plots": [str(path) for path in paths]}
    if args.checkpoint:
        return evaluate_run(args.checkpoint)
    if args.refs is None:
        parser.error("give --refs (the references to score against), --checkpoint RUN_DIR, or --plots RUN_DIR")
    refs = read_references(args.refs)
    # Hypotheses come from a file; decoding a checkpoint into hypotheses plugs in here.
    if args.hyps is None:
        parser.error("give --hyps: a file of system outputs, one line per MR")
    hyps = read_hypotheses(args.hyps)
    scores = e2e_metrics(hyps, refs)
    print(json.dumps(scores, indent=2))
    return scores


if __name__ == "__main__":
    main()
