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
    the CPU. The frozen base is stored in the autocast dtype (half the memory, and no re-cast of
    every weight at every call) on CUDA, and with --dtype bfloat16 on the CPU too (measured there:
    a training step 0.63x and greedy decoding 0.8x the float32 time; bench/bench_model.py); full
    fine-tuning trains the weights themselves, which stay float32."""
    if dtype == "auto":
        bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
        amp_dtype = (torch.bfloat16 if bf16 else torch.float16) if device_type == "cuda" else None
    elif dtype in ("float32", "bfloat16", "float16"):
        amp_dtype = None if dtype == "float32" else getattr(torch, dtype)
    else:
        raise ConfigError(f"dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    low_precision_base = amp_dtype is not None and method != "full" and (
        device_type == "cuda" or amp_dtype == torch.bfloat16)
    return amp_dtype, amp_dtype if low_precision_base else torch.float32


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
