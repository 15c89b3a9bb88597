"""metrics.py's metrics against independent references.

E2E: the official scorer's scores on real test-set outputs (fixtures/e2e_official_scores.json, made by
fixtures/make_e2e_scorer_fixture.py with tuetschek/e2e-metrics), tokens from the official tokenisers
(Stanford CoreNLP 3.4.1 PTBTokenizer, mteval-v13a's `tokenization`), and closed-form small cases.
GLUE: sklearn and scipy on random predictions.
"""
import functools
import json
import math
import random
import shutil
import sys
import warnings
from pathlib import Path

import pytest

import eval as eval_cli
import metrics as evaluation
from conftest import SHARED_DATA
from data import group_references, load_e2e_split

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_e2e_scorer_fixture import build_outputs  # noqa: E402  (how the fixture's outputs were made)

OFFICIAL = json.loads((FIXTURES / "e2e_official_scores.json").read_text())
# Agreement with the official scorer that issue 5 asks for (it prints 4 decimals).
TOLERANCE = {"BLEU": 0.002, "NIST": 0.05, "METEOR": 0.002, "ROUGE_L": 0.005, "CIDEr": 0.02}
METEOR_RUNS = evaluation.find_meteor_jar() is not None and shutil.which("java") is not None
TEST_CSV = SHARED_DATA / "e2e" / "original" / "testset_w_refs.csv"


# -----------------------------------------------------------------------------
# The five E2E metrics vs the official scorer


def e2e_set(name):
    """(hypotheses, reference groups) of one fixture set, as the official scorer was given them."""
    subset_refs = evaluation.read_multi_references(FIXTURES / "e2e_subset_refs.txt")
    if name == "subset":
        return evaluation.read_hypotheses(FIXTURES / "e2e_subset_hyps.txt"), subset_refs
    if name == "edge":
        hyps = evaluation.read_hypotheses(FIXTURES / "e2e_edge_hyps.txt")
        return hyps, subset_refs[:len(hyps)]
    if not TEST_CSV.is_file():
        pytest.skip(f"shared data not found at {TEST_CSV}")
    _, refs = build_outputs(group_references(load_e2e_split(TEST_CSV)))
    return evaluation.read_hypotheses(FIXTURES / "e2e_test_hyps.txt"), refs


@functools.cache
def our_scores(name):
    return evaluation.e2e_metrics(*e2e_set(name))  # one METEOR jar run per set


def check_against_official(ours, official):
    for metric, tolerance in TOLERANCE.items():
        if metric == "METEOR" and not METEOR_RUNS:
            assert ours[metric] is None, "METEOR without Java or the jar must be None, never a number"
            continue
        assert abs(ours[metric] - official[metric]) <= tolerance, (metric, ours[metric], official[metric])


@pytest.mark.parametrize("name", ["subset", "full_test", "edge"])
def test_e2e_metrics_agree_with_official_scorer(name):
    """100 and 630 real test MRs (their held-out reference or a wrong one as output), and 12 outputs
    that are hard to tokenise: empty, pre-tokenised LoRA style, curly quotes, glued sentences."""
    hyps, refs = e2e_set(name)
    assert len(hyps) == len(refs) == {"subset": 100, "full_test": 630, "edge": 12}[name]
    check_against_official(our_scores(name), OFFICIAL[name])


def test_cli_reads_csv_references_as_the_official_scorer_groups_them(shared_data, monkeypatch, capsys):
    # METEOR is checked above; hiding the jar keeps this test fast and exercises the fallback.
    monkeypatch.setenv("KASA_METEOR_JAR", str(FIXTURES / "no-such.jar"))
    eval_cli.main(["--refs", str(shared_data / "e2e" / "original" / "testset_w_refs.csv"),
                   "--hyps", str(FIXTURES / "e2e_test_hyps.txt")])
    printed = json.loads(capsys.readouterr().out)
    assert printed["METEOR"] is None
    official = OFFICIAL["full_test_csv_refs"]
    for metric in ("BLEU", "NIST", "ROUGE_L", "CIDEr"):
        assert abs(printed[metric] - official[metric]) <= TOLERANCE[metric], metric


def test_meteor_unavailable_is_none_with_the_fix(monkeypatch, capsys):
    monkeypatch.setattr(evaluation.shutil, "which", lambda name: None)  # no java on PATH
    scores = evaluation.e2e_metrics(["a pub near the river"], [["a pub by the river"]])
    assert scores["METEOR"] is None
    warning = capsys.readouterr().err
    assert "METEOR unavailable (no java)" in warning and "pip install pycocoevalcap" in warning
    assert scores["BLEU"] > 0  # the other metrics still run


# -----------------------------------------------------------------------------
# Tokenisers: expected tokens are the official tools' output (CoreNLP 3.4.1 PTBTokenizer
# -preserveLines -lowerCase, then pycocoevalcap's punctuation removal; mteval-v13a `tokenization`)

PTB_CASES = [
    ("Blue Spice isn't family-friendly; it's near the Café.",
     ["blue", "spice", "is", "n't", "family-friendly", "it", "'s", "near", "the", "café"]),
    ("it 's a pub . it is n't cheap , you 'll see .",
     ["it", "'s", "a", "pub", "it", "is", "n't", "cheap", "you", "'ll", "see"]),
    ("Prices are £20-25 or more than £30.", ["prices", "are", "#", "20-25", "or", "more", "than", "#", "30"]),
    ("The Eagle (riverside) serves U.S. food, e.g. burgers.",
     ["the", "eagle", "-lrb-", "riverside", "-rrb-", "serves", "u.s.", "food", "e.g.", "burgers"]),
    ("“Great” food – it’s rated 5/5…", ["great", "food", "it", "'s", "rated", "5/5"]),
    ("Cocum.It is cheap and good!", ["cocum.it", "is", "cheap", "and", "good"]),
    ("You cannot miss it, Mr. Smith.", ["you", "can", "not", "miss", "it", "mr.", "smith"]),
    ("Open 3:30pm, 1,000 seats, O'Brien's and/or Zizzi's.",
     ["open", "3:30", "pm", "1,000", "seats", "o'brien", "'s", "and/or", "zizzi", "'s"]),
]
MTEVAL_CASES = [
    ("Blue Spice isn't family-friendly; it's near the Café.",
     ["blue", "spice", "isn't", "family-friendly", ";", "it's", "near", "the", "café", "."]),
    ("Prices are £20-25, rated 3.5 out of 5.",
     ["prices", "are", "£20", "-", "25", ",", "rated", "3.5", "out", "of", "5", "."]),
    ("A (kid) friendly U.S. pub &amp; bar: 10,000 or 20-25!",
     ["a", "(", "kid", ")", "friendly", "u", ".", "s", ".", "pub", "&", "bar", ":", "10,000", "or", "20",
      "-", "25", "!"]),
    ("ÉCOLE Zizzi's 1.5.", ["École", "zizzi's", "1.5", "."]),  # lowercasing is ASCII-only
]


@pytest.mark.parametrize("text,tokens", PTB_CASES)
def test_ptb_tokens_match_corenlp(text, tokens):
    assert evaluation.tokenize_ptb(text) == tokens


@pytest.mark.parametrize("text,tokens", MTEVAL_CASES)
def test_mteval_tokens_match_the_perl_script(text, tokens):
    assert evaluation.tokenize_mteval(text) == tokens


# -----------------------------------------------------------------------------
# Closed-form cases


def test_bleu_of_identical_text_is_one():
    text = "The Eagle is a cheap coffee shop near Burger King."
    assert evaluation.bleu_score([text], [[text, "Something else entirely."]]) == pytest.approx(1.0)


def test_bleu_geometric_mean_of_clipped_precisions():
    # 1- to 4-gram matches 4/5, 3/4, 2/3, 1/2 and equal lengths (no brevity penalty).
    expected = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert evaluation.bleu_score(["a b c d e"], [["a b c d f"]]) == pytest.approx(expected, abs=1e-12)
    # A clipped unigram: "a" appears 3 times in the output but twice in the reference.
    assert evaluation.bleu_score(["a a a"], [["a a b"]]) == pytest.approx(
        (2 / 3 * 1 / 2 * 1 / (2 * 1) * 1) ** 0.25, abs=1e-12)  # 3-gram: 0 of 1, smoothed to 1/2


def test_bleu_smooths_zero_matches_as_mteval():
    # 4-grams: 0 of 2 matches counts as 1 / (2 * 2), mteval's 1/2^k for the k-th such order.
    expected = (3 / 5 * 2 / 4 * 1 / 3 * 1 / 4) ** 0.25
    assert evaluation.bleu_score(["a b c x y"], [["a b c d e"]]) == pytest.approx(expected, abs=1e-12)


def test_bleu_brevity_penalty_uses_the_closest_reference_shorter_on_ties():
    # Output length 3; references of 2 and 4 words tie, so the shorter (2) is used: no penalty.
    assert evaluation.bleu_score(["a b c"], [["a b", "a b c d"]]) == pytest.approx(1.0)
    # One 6-word reference: penalty exp(1 - 6/3); no 4-grams in the output, so that order is skipped.
    assert evaluation.bleu_score(["a b c"], [["a b c d e f"]]) == pytest.approx(math.exp(-1), abs=1e-12)


def test_nist_information_weights_and_length_penalty():
    # Unigram info log2(2/1) = 1 each, bigram info log2(count(a)/count(a b)) = 0: (1 + 1)/2 + 0/1.
    assert evaluation.nist_score(["a b"], [["a b"]]) == pytest.approx(1.0)
    # Output half the reference length: info 1 over 1 unigram, times exp(-beta log^2 0.5) with
    # beta chosen so that a length ratio of 2/3 gives 0.5.
    beta = -math.log(0.5) / math.log(1.5) ** 2
    assert evaluation.nist_score(["a"], [["a b"]]) == pytest.approx(math.exp(-beta * math.log(0.5) ** 2))


def test_lcs_length():
    assert evaluation.lcs_length(list("abcbdab"), list("bdcaba")) == 4
    assert evaluation.lcs_length([], list("abc")) == 0


def test_rouge_l_f_measure_with_beta():
    precision, recall, beta = 3 / 4, 3 / 5, 1.2  # LCS "a c d" of 4 output and 5 reference words
    expected = (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)
    assert evaluation.rouge_l_score(["a b c d"], [["a c d e f"]]) == pytest.approx(expected, abs=1e-12)
    assert evaluation.rouge_l_score([""], [["a b"]]) == 0.0


def test_cider_of_outputs_equal_to_their_references():
    # Two segments, every n-gram in one of them: idf log 2 everywhere, cosine 1 for 1- and 2-grams,
    # 0 for the absent 3- and 4-grams, no length penalty: 10 * mean(1, 1, 0, 0) = 5.
    assert evaluation.cider_score(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(5.0)


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference groups"):
        evaluation.bleu_score(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="reference group is empty"):
        evaluation.rouge_l_score(["a"], [[]])


# -----------------------------------------------------------------------------
# File formats


def test_files_round_trip_one_output_per_line(tmp_path):
    hyps = ["a\u2028b", " c\r\nd ", "", "e"]  # every Unicode line break becomes a space
    evaluation.write_hypotheses(tmp_path / "hyps.txt", hyps)
    assert evaluation.read_hypotheses(tmp_path / "hyps.txt") == ["a b", "c d", "", "e"]
    refs = [["x", "y\nz"], ["w"]]
    evaluation.write_multi_references(tmp_path / "refs.txt", refs)
    assert evaluation.read_references(tmp_path / "refs.txt") == [["x", "y z"], ["w"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hyps.txt", "refs.txt"]  # no temp files left


def test_reference_text_without_blank_lines_is_single_reference(tmp_path):
    (tmp_path / "refs.txt").write_text("first output's reference\nsecond output's reference\n")
    assert evaluation.read_references(tmp_path / "refs.txt") == [["first output's reference"],
                                                                  ["second output's reference"]]


# -----------------------------------------------------------------------------
# GLUE metrics vs sklearn / scipy

sklearn_metrics = pytest.importorskip("sklearn.metrics")
scipy_stats = pytest.importorskip("scipy.stats")


def random_classes(rng, n, classes=2):
    return [rng.randrange(classes) for _ in range(n)]


def test_classification_metrics_match_sklearn():
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 100, 1000):
        for _ in range(20):
            labels, predictions = random_classes(rng, n), random_classes(rng, n)
            assert evaluation.accuracy(predictions, labels) == pytest.approx(
                sklearn_metrics.accuracy_score(labels, predictions), abs=1e-12)
            assert evaluation.f1_score(predictions, labels) == pytest.approx(
                sklearn_metrics.f1_score(labels, predictions, zero_division=0.0), abs=1e-12)
            assert evaluation.matthews_correlation(predictions, labels) == pytest.approx(
                sklearn_metrics.matthews_corrcoef(labels, predictions), abs=1e-12)
    labels, predictions = random_classes(rng, 200, classes=3), random_classes(rng, 200, classes=3)
    assert evaluation.matthews_correlation(predictions, labels) == pytest.approx(
        sklearn_metrics.matthews_corrcoef(labels, predictions), abs=1e-12)


def test_classification_metrics_on_constant_predictions():
    labels = [0, 1, 1, 0, 1]
    for constant in (0, 1):
        predictions = [constant] * len(labels)
        assert evaluation.matthews_correlation(predictions, labels) == 0.0
        assert sklearn_metrics.matthews_corrcoef(labels, predictions) == 0.0
        assert evaluation.f1_score(predictions, labels) == pytest.approx(
            sklearn_metrics.f1_score(labels, predictions, zero_division=0.0), abs=1e-12)
    assert evaluation.f1_score([0, 0], [0, 0]) == 0.0  # no positive anywhere
    assert evaluation.matthews_correlation([1, 0], [1, 1]) == 0.0  # constant labels


def test_correlations_match_scipy_with_ties():
    rng = random.Random(0)
    for n in (2, 3, 10, 100, 1500):
        for _ in range(10):
            labels = [rng.choice([0.0, 0.5, 1.0, 2.2, 2.2, 3.8, 5.0]) for _ in range(n)]  # many ties
            predictions = [rng.choice([rng.uniform(0, 5), 2.5]) for _ in range(n)]
            if len(set(labels)) == 1 or len(set(predictions)) == 1:
                continue
            assert evaluation.pearson_correlation(predictions, labels) == pytest.approx(
                scipy_stats.pearsonr(predictions, labels)[0], abs=1e-12)
            assert evaluation.spearman_correlation(predictions, labels) == pytest.approx(
                scipy_stats.spearmanr(predictions, labels)[0], abs=1e-12)
            assert evaluation.average_ranks(labels) == pytest.approx(
                list(scipy_stats.rankdata(labels, method="average")))


def test_correlations_of_constant_predictions_are_zero_where_scipy_is_nan():
    labels = [0.0, 1.5, 3.0, 4.5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about constant input
        assert math.isnan(scipy_stats.pearsonr([2.5] * 4, labels)[0])
        assert math.isnan(scipy_stats.spearmanr([2.5] * 4, labels)[0])
    assert evaluation.pearson_correlation([2.5] * 4, labels) == 0.0
    assert evaluation.spearman_correlation([2.5] * 4, labels) == 0.0


@pytest.mark.parametrize("task,names", [
    ("sst2", {"accuracy"}), ("qnli", {"accuracy"}), ("rte", {"accuracy"}),
    ("mrpc", {"accuracy", "f1"}), ("cola", {"matthews"}), ("stsb", {"pearson", "spearman"})])
def test_glue_metrics_per_task(task, names):
    rng = random.Random(1)
    if task == "stsb":
        labels, predictions = [rng.uniform(0, 5) for _ in range(50)], [rng.uniform(0, 5) for _ in range(50)]
    else:
        labels, predictions = random_classes(rng, 50), random_classes(rng, 50)
    reference = {"accuracy": lambda: sklearn_metrics.accuracy_score(labels, predictions),
                 "f1": lambda: sklearn_metrics.f1_score(labels, predictions),
                 "matthews": lambda: sklearn_metrics.matthews_corrcoef(labels, predictions),
                 "pearson": lambda: scipy_stats.pearsonr(predictions, labels)[0],
                 "spearman": lambda: scipy_stats.spearmanr(predictions, labels)[0]}
    scores = evaluation.glue_metrics(task, predictions, labels)
    assert set(scores) == names
    for name, value in scores.items():
        assert value == pytest.approx(reference[name](), abs=1e-12)


def test_glue_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="unknown GLUE task 'mnli'"):
        evaluation.glue_metrics("mnli", [0], [0])
    with pytest.raises(ValueError, match="2 predictions and 3 labels"):
        evaluation.glue_metrics("sst2", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="0 predictions and 0 labels"):
        evaluation.accuracy([], [])
