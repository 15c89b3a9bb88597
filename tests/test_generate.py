"""eval.py's beam search and greedy decoding against transformers' on tiny random models. Offline.

The reference is `generate(num_beams=K, early_stopping=False, do_sample=False)` (K=1: greedy) run
one prompt at a time (no padding), with transformers' own NoRepeatNGramLogitsProcessor applied to
the generated tokens only: eval.py deliberately blocks repeats inside the continuation, not the
prompt. Ours also runs with fewer prompts in flight than prompts (continuous batching: a finished
prompt hands its rows to the next), which must not change a single token.
"""
import math
import random
import sys
from collections import Counter

import pytest
import torch

import eval as E
import model as M
from conftest import REPO
from test_model import save, tiny_gpt2, tiny_llama

sys.path.insert(0, str(REPO / "bench"))
from bench_decode import continuation_no_repeat_ngram  # noqa: E402  (the one definition, beside its benchmark)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

PROMPT_LENGTHS = (5, 9, 2, 7)
SEARCH = E.BeamSearchConfig(num_beams=4, max_new_tokens=12, length_penalty=0.9, no_repeat_ngram_size=3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: syncing threads costs more than it saves, a lot more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class BlankLineCriteria(transformers.StoppingCriteria):
    """Ends a hypothesis once its decoded continuation holds a blank line (checked on the text)."""

    def __init__(self, tokenizer, prompt_len):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.decode_batch(input_ids[:, self.prompt_len:].tolist())
        return torch.tensor([E.BLANK_LINE.search(text) is not None for text in texts])


def hf_beam_search(hf, prompt, config, eos=None, stopping=None, early_stopping=False):
    """transformers' best continuation for one prompt, cut before the first eos."""
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      num_beams=config.num_beams, max_new_tokens=config.max_new_tokens,
                      length_penalty=config.length_penalty, early_stopping=early_stopping, do_sample=False,
                      eos_token_id=eos, pad_token_id=eos[0] if eos else 0,
                      logits_processor=transformers.LogitsProcessorList(
                          [continuation_no_repeat_ngram(config.no_repeat_ngram_size, len(prompt))]),
                      stopping_criteria=transformers.StoppingCriteriaList(stopping or []))
    tokens = out[0, len(prompt):].tolist()
    return tokens[:next((i for i, t in enumerate(tokens) if eos and t in eos), len(tokens))]


def sharpened(build, scale):
    """A tiny random model whose next-token distributions are peaked enough that float rounding
    (ours vs transformers) cannot swap two candidates."""
    torch.manual_seed(0)
    hf = build()
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        hf.lm_head.weight.mul_(scale)
    return hf


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa"])
def pair(request, tmp_path_factory):
    hf = sharpened(tiny_gpt2 if request.param == "gpt2" else lambda: tiny_llama(kv_heads=2),
                   2.0 if request.param == "gpt2" else 4.0)
    ours, _ = M.load_pretrained(save(hf, tmp_path_factory.mktemp(request.param)))
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    return hf, ours, prompts


def likely_tokens(hf, prompts, config):
    """Tokens transformers' beam search emits most often after the first two steps, most frequent first."""
    counts = Counter(t for p in prompts for t in hf_beam_search(hf, p, config)[2:])
    return [t for t, _ in counts.most_common()]


@pytest.mark.parametrize("n_eos", [1, 2])
def test_beam_search_matches_transformers(pair, n_eos):
    hf, ours, prompts = pair
    # End-of-text tokens the model actually produces, so that hypotheses finish at different steps.
    eos = likely_tokens(hf, prompts, SEARCH)[:n_eos]
    expected = [hf_beam_search(hf, p, SEARCH, eos) for p in prompts]
    assert any(len(e) < SEARCH.max_new_tokens for e in expected), "no hypothesis ended with eos: pick another eos"
    batched = E.beam_search(ours, prompts, eos, SEARCH)
    assert batched == expected
    assert E.beam_search(ours, prompts[1:3], eos, SEARCH) == expected[1:3]
    for in_flight in (1, 2, 3):  # prompts finish at different steps and hand their rows on
        assert E.beam_search(ours, prompts, eos, SEARCH, batch_size=in_flight) == expected


GREEDY = E.BeamSearchConfig(num_beams=1, max_new_tokens=12, no_repeat_ngram_size=3)


@pytest.mark.parametrize("n_eos", [1, 2])
def test_greedy_matches_transformers(pair, n_eos):
    hf, ours, prompts = pair
    counts = Counter(t for p in prompts for t in hf_beam_search(hf, p, GREEDY)[1:])
    eos = [t for t, _ in counts.most_common()][:n_eos]
    expected = [hf_beam_search(hf, p, GREEDY, eos) for p in prompts]
    assert len({len(e) for e in expected}) > 1, "every prompt stops at the same step: pick another eos"
    for in_flight in (None, 1, 3):
        assert E.greedy_search(ours, prompts, eos, GREEDY, batch_size=in_flight) == expected


def test_early_stop_rule_matches_transformers(pair):
    hf, ours, prompts = pair
    # Look for settings where the early-stop rule decides the answer: transformers' default
    # (stop once no running beam, scored at the current length, beats the worst finished one)
    # and early_stopping="never" (score it at max length instead) disagree.
    for length_penalty, first in ((lp, i) for lp in (0.9, 1.5) for i in range(6)):
        config = E.BeamSearchConfig(num_beams=3, max_new_tokens=12, length_penalty=length_penalty,
                                    no_repeat_ngram_size=3)
        eos = likely_tokens(hf, prompts, config)[first:first + 2]
        expected = [hf_beam_search(hf, p, config, eos) for p in prompts]
        if expected != [hf_beam_search(hf, p, config, eos, early_stopping="never") for p in prompts]:
            break
    else:
        pytest.fail("the early-stop rule never changes the answer here: try other settings")
    assert E.beam_search(ours, prompts, eos, config) == expected


def test_batched_equals_one_prompt_at_a_time(pair):
    _, ours, prompts = pair
    prompts = prompts + [prompts[0][:1]]  # a one-token prompt: nothing to prefill
    for search, beams in ((E.beam_search, 3), (E.greedy_search, 1)):
        config = E.BeamSearchConfig(num_beams=beams, max_new_tokens=10, length_penalty=1.3, no_repeat_ngram_size=2)
        alone = [search(ours, [p], None, config)[0] for p in prompts]
        assert all(len(tokens) == 10 for tokens in alone)  # no eos: every hypothesis runs to the limit
        for in_flight in (None, 2):
            assert search(ours, prompts, None, config, batch_size=in_flight) == alone


def test_one_beam_is_greedy(pair):
    _, ours, prompts = pair
    config = E.BeamSearchConfig(num_beams=1, max_new_tokens=12, no_repeat_ngram_size=0)
    eos = ours.generate(torch.tensor([prompts[0]]), max_new_tokens=4)[0, -1].item()  # greedy's 4th token
    for prompt in prompts:
        greedy = ours.generate(torch.tensor([prompt]), max_new_tokens=12, eos_token_id=eos)[0, len(prompt):].tolist()
        greedy = greedy[:greedy.index(eos) if eos in greedy else 12]
        assert E.beam_search(ours, [prompt], eos, config)[0] == greedy
        assert E.greedy_search(ours, [prompt], eos, config)[0] == greedy


def test_repeated_ngram_ban_with_rows_of_different_lengths():
    generator = torch.Generator().manual_seed(3)
    generated = torch.randint(0, 3, (40, 12), generator=generator)  # 3 tokens: many repeats
    lengths = torch.randint(0, 13, (40,), generator=generator)
    for n in (1, 2, 3, 4):
        scores = torch.zeros(40, 3)
        E.block_repeated_ngrams(scores, generated, lengths, n)
        for row, length in zip(range(40), lengths.tolist()):
            tokens = generated[row, :length].tolist()
            suffix = tokens[len(tokens) - n + 1:] if n > 1 else []
            banned = {tokens[i + n - 1] for i in range(length - n + 1) if tokens[i:i + n - 1] == suffix}
            assert {t for t in range(3) if scores[row, t] == -math.inf} == banned, (n, tokens)
            assert (scores[row] != -math.inf).eq(scores[row] == 0).all()


# ----------------------------------------------------------------------------- blank lines

def tokenizer_for(texts):
    """A tokenizer whose token i decodes to texts[i] (and a sequence to their concatenation)."""
    from tokenizers import Tokenizer, decoders, models
    tokenizer = Tokenizer(models.WordLevel({text: i for i, text in enumerate(texts)}, unk_token=None))
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


LINE_TEXTS = ["\n", " ", "\t", "a", "b c", "a\n", "\n ", " \n", "\n\n", ". \n\t\n", "x \n y"]


def test_blank_line_tables_agree_with_the_text():
    tokenizer = tokenizer_for(LINE_TEXTS)
    stop = E.BlankLineStop(tokenizer, vocab_size=len(LINE_TEXTS) + 2)  # two ids the tokenizer lacks
    assert not stop.closes[-2:].any() and stop.blank[-2:].all()
    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.randrange(len(LINE_TEXTS)) for _ in range(8)]
        line_open, ends_at = torch.zeros(1, dtype=torch.bool), None
        for i, t in enumerate(tokens):
            if stop.ending_tokens(line_open)[0, t]:
                ends_at = i
                break
            line_open = stop.advance(line_open, torch.tensor([t]))
        first_blank_line = next((i for i in range(len(tokens))
                                 if E.BLANK_LINE.search(tokenizer.decode(tokens[:i + 1]))), None)
        assert ends_at == first_blank_line, [LINE_TEXTS[t] for t in tokens]


@pytest.fixture(scope="module")
def line_model(tmp_path_factory):
    """Tiny Llama plus a tokenizer that gives its favourite tokens newline and space texts."""
    hf = sharpened(lambda: tiny_llama(kv_heads=2), 4.0)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 96, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    favourites = likely_tokens(hf, prompts, SEARCH)
    texts = [f"w{i}" for i in range(96)]
    for token, text in zip(favourites, ["\n", " ", "a\n", " \n", "\t"]):  # blank lines span tokens
        texts[token] = text
    ours, _ = M.load_pretrained(save(hf, tmp_path_factory.mktemp("lines")))
    return hf, ours, tokenizer_for(texts), prompts


def test_blank_line_stop_matches_transformers_with_a_text_criterion(line_model):
    hf, ours, tokenizer, prompts = line_model
    stop = E.BlankLineStop(tokenizer, 96)
    expected = [hf_beam_search(hf, p, SEARCH, stopping=[BlankLineCriteria(tokenizer, len(p))]) for p in prompts]
    ended = [E.BLANK_LINE.search(tokenizer.decode(e)) is not None for e in expected]
    assert any(ended) and not all(ended), "the blank-line stop is not exercised: give other tokens newlines"
    assert E.beam_search(ours, prompts, None, SEARCH, blank_line=stop) == expected


def test_greedy_blank_line_stop_matches_transformers(line_model):
    hf, ours, tokenizer, prompts = line_model
    stop = E.BlankLineStop(tokenizer, 96)
    config = E.BeamSearchConfig(num_beams=1, max_new_tokens=24, no_repeat_ngram_size=3)
    expected = [hf_beam_search(hf, p, config, stopping=[BlankLineCriteria(tokenizer, len(p))]) for p in prompts]
    ended = [E.BLANK_LINE.search(tokenizer.decode(e)) is not None for e in expected]
    assert any(ended) and not all(ended), "the blank-line stop is not exercised: give other tokens newlines"
    assert E.greedy_search(ours, prompts, None, config, blank_line=stop, batch_size=2) == expected


@pytest.mark.parametrize("beams", [4, 1])
def test_generate_texts_cuts_at_blank_line_and_keeps_order(line_model, capsys, beams):
    _, ours, tokenizer, prompts = line_model
    config = E.BeamSearchConfig(num_beams=beams, max_new_tokens=24, no_repeat_ngram_size=3)
    texts = E.generate_texts(ours, tokenizer, prompts, None, config, batch_size=3)
    stop = E.BlankLineStop(tokenizer, 96)
    search = E.beam_search if beams > 1 else E.greedy_search  # num_beams=1 decodes greedily
    for prompt, text in zip(prompts, texts):
        full = tokenizer.decode(search(ours, [prompt], None, config, blank_line=stop)[0])
        assert text == text.strip() and "\n\n" not in text and full.lstrip().startswith(text)
        assert text == E.BLANK_LINE.split(full, maxsplit=1)[0].strip()
    assert "decoded 3/4 prompts" in capsys.readouterr().err  # progress every batch_size prompts and at the end


# ----------------------------------------------------------------------------- errors

def test_errors(pair):
    _, ours, prompts = pair
    with pytest.raises(ValueError, match="non-empty"):
        E.beam_search(ours, [prompts[0], []])
    ours.train()
    try:
        with pytest.raises(ValueError, match="model.eval()"):
            E.beam_search(ours, prompts)
    finally:
        ours.eval()
    if ours.pos_emb is not None:  # GPT-2's learned positions end at max_position
        with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
            E.beam_search(ours, prompts, config=E.BeamSearchConfig(max_new_tokens=60))


# ----------------------------------------------------------------------------- the KV cache, row by row

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cache_filled_row_by_row_equals_each_sequence_alone(family):
    """Rows restarted with prompts of their own lengths (as continuous batching does), then stepped
    together, give each sequence's logits computed alone, also after an in-place reorder."""
    torch.manual_seed(0)
    model = M.Transformer(M.ModelConfig(family=family, vocab_size=50, n_layer=2, n_head=4, n_kv_head=2 if family == "llama" else None,
                                        d_model=32, d_ff=48, max_position=32)).eval()
    sequences = [torch.randint(0, 50, (n,)).tolist() for n in (7, 3, 5)]
    steps = torch.randint(0, 50, (3, 4))
    with torch.no_grad():
        cache = model.new_cache(3, 12)
        model(torch.randint(0, 50, (3, 6)), cache=cache)  # stale keys of earlier prompts, to be masked
        for row in (2, 0, 1):  # one at a time, as prompts finish
            prefill = model.new_cache(1, len(sequences[row]))
            model(torch.tensor([sequences[row]]), cache=prefill)
            cache.start_rows([row], [len(sequences[row])], prefill, [0])
        assert cache.row_lengths.tolist() == [7, 3, 5] and cache.length == 7
        stepped = [model(steps[:, t:t + 1], cache=cache)[0][:, 0] for t in range(2)]
        cache.reorder(torch.tensor([0, 2, 1]))  # rows 1 and 2 swap, in place, lengths too
        stepped.append(model(steps[[0, 2, 1], 2:3], cache=cache)[0][:, 0])
        for row, order in ((0, 0), (1, 2), (2, 1)):
            alone = model(torch.tensor([sequences[order] + steps[order, :3].tolist()]))[0][0, -3:]
            ours = torch.stack([stepped[0][order], stepped[1][order], stepped[2][row]])
            torch.testing.assert_close(ours, alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="filled row by row"):
        model(steps[:, :1], attention_mask=torch.ones(3, cache.length + 1), cache=cache)
