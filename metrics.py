"""The task metrics, re-implemented so that they agree with the official scorers.

E2E: the five scores of the official E2E NLG Challenge scorer (tuetschek/e2e-metrics,
measure_scores.py), and the file formats it reads:
  BLEU, NIST  as mteval-v13a-sig.pl computes them (the scorer's default, Perl), with its tokeniser;
  METEOR      by the METEOR 1.5 jar (PyPI pycocoevalcap ships it), fed PTB-tokenised text;
  ROUGE-L     and CIDEr as the scorer's copy of pycocoevalcap computes them on PTB-tokenised text.
All scores are on the official scale: BLEU 0-1 (0.6925, not 69.25), NIST ~8.7, CIDEr ~2.4.
GLUE: accuracy, F1, Matthews, Pearson and Spearman correlation, as GLUE picks them per task.

A reader following the tutorial (kasa.py -> model.py -> train.py -> eval.py) may skip this file:
eval.py calls `e2e_metrics`, train.py calls `glue_metrics`.
"""
import functools
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from data import group_references, load_e2e_split
from errors import DataError, reading
from files import write_text_atomic

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
        raise DataError("no hypotheses to score: the outputs are empty")
    if len(hyps) != len(refs):
        raise DataError(f"{len(hyps)} hypotheses but {len(refs)} reference groups; they must be "
                         "in the same order, one group per hypothesis")
    if any(len(group) == 0 for group in refs):
        raise DataError("a reference group is empty; every hypothesis needs at least one reference")


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


# -----------------------------------------------------------------------------
# File formats (as e2e-metrics reads them)
#
# e2e-metrics reads text with codecs.open, which ends a line at every Unicode line boundary
# (\r, \x85, \u2028, ...), as str.splitlines does; the writers fold those into spaces so that
# one output stays one line.


def _read_lines(path) -> list[str]:
    with reading(path, DataError, "expected UTF-8 text, one output per line (references: groups "
                                  "separated by blank lines)"):
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _one_line(text: str) -> str:
    return " ".join(text.splitlines()).strip()


def read_hypotheses(path) -> list[str]:
    """One system output per line."""
    return _read_lines(path)


def write_hypotheses(path, hyps: list[str]) -> None:
    write_text_atomic(path, "".join(_one_line(hyp) + "\n" for hyp in hyps))


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
    write_text_atomic(path, "\n\n".join("\n".join(map(_one_line, group)) for group in refs) + "\n")


def read_references(path) -> list[list[str]]:
    """References from multi-reference text, or from an E2E CSV (mr,ref) grouped by MR in order of
    first appearance. Text without any blank line holds one reference per output, as e2e-metrics
    reads it."""
    if Path(path).suffix.lower() == ".csv":
        groups = group_references(load_e2e_split(path))
        if not all(refs for _, refs in groups):
            raise DataError(f"{path} has no 'ref' column: an E2E CSV of references needs mr,ref columns "
                            "(testset.csv holds the MRs only; score against testset_w_refs.csv)")
        return [refs for _, refs in groups]
    groups = read_multi_references(path)
    if not groups:
        raise DataError(f"{path} holds no references; expected one group of lines per output, "
                        "groups separated by a blank line")
    return [[ref] for ref in groups[0]] if len(groups) == 1 else groups


def score_files(refs_path, hyps_path) -> dict[str, float | None]:
    """`eval.py --refs REFS --hyps HYPS`: the five E2E metrics of the outputs in one file against the other's."""
    refs, hyps = read_references(refs_path), read_hypotheses(hyps_path)
    if len(hyps) != len(refs):
        raise DataError(f"{hyps_path} holds {len(hyps)} outputs but {refs_path} holds {len(refs)} reference "
                        "groups; give one output per line, in the order of the reference groups")
    return e2e_metrics(hyps, refs)
