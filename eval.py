"""Generation and task metrics for KaSA experiments.

    python eval.py --refs REFS --hyps HYPS      # prints the E2E metrics as JSON

Metrics: the five scores of the official E2E NLG Challenge scorer (tuetschek/e2e-metrics,
measure_scores.py), re-implemented here so that they agree with it:
  BLEU, NIST  as mteval-v13a-sig.pl computes them (the scorer's default, Perl), with its tokeniser;
  METEOR      by the METEOR 1.5 jar (PyPI pycocoevalcap ships it), fed PTB-tokenised text;
  ROUGE-L     and CIDEr as the scorer's copy of pycocoevalcap computes them on PTB-tokenised text.
All scores are on the official scale: BLEU 0-1 (0.6925, not 69.25), NIST ~8.7, CIDEr ~2.4.
"""
import argparse
import csv
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from data import group_references, load_e2e_split

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
_PTB_TOKEN = re.compile(r"""
      \d+(?:[.,/]\d+)+(?:-[^\W_]+)*             # numbers: 30.99, 1,000, 5/5
    | (?<![^\W_])-\d+(?:[.,]\d+)*               # signed number after a space or symbol: -25
    | (?:[^\W\d_]\.){2,}                        # acronyms: u.s., e.g., p.m.
    | (?i:mr|mrs|ms|dr|st|jr|sr|prof|mt|vs|etc|inc|ltd|co)\.(?=\s)  # titles keep their period
    | [^\W_]+(?:['\-][^\W_]+)*\.(?=[,;:])       # PTB keeps a period before ,;: ("center.,")
    | [^\W_]+(?:['\-][^\W_]+)*                  # words, hyphenated words, words with apostrophes
    | \.\.\. | -- | [?!]+                       # multi-character punctuation
    | \S                                        # any other symbol
""", re.VERBOSE)
_PTB_CLITIC = re.compile(r"(?i)^(.+?)(n't|'s|'re|'ll|'ve|'d|'m)$")  # don't -> do n't
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# PUNCTUATIONS also lists -LRB- -RRB- -LCB- -RCB-, which never match lowercased tokens. The raw '"'
# stands in for PTB's `` and '' (both removed), since this tokeniser keeps double quotes as they are.
_COCO_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}


def tokenize_ptb(text: str) -> list[str]:
    """Tokens as the COCO scorers (METEOR, ROUGE-L, CIDEr) see them, lowercased, punctuation gone."""
    # PTB normalizeCurrency turns the pound sign into its own token '#'.
    text = text.replace("\n", " ").replace("£", " # ").replace('"', ' " ')
    tokens = []
    for token in _PTB_TOKEN.findall(text):
        clitic = _PTB_CLITIC.match(token)
        if token.lower() == "cannot":
            tokens += [token[:3], token[3:]]
        elif clitic:
            tokens += [clitic.group(1), clitic.group(2)]
        else:
            tokens.append(_PTB_BRACKETS.get(token, token))
    return [t for t in (t.lower() for t in tokens) if t not in _COCO_PUNCTUATION]


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


# =============================================================================
# File formats (as e2e-metrics reads them)
# =============================================================================


def read_hypotheses(path) -> list[str]:
    """One system output per line."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f]


def write_hypotheses(path, hyps: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for hyp in hyps:
            f.write(hyp.replace("\n", " ").strip() + "\n")


def read_multi_references(path) -> list[list[str]]:
    """Groups of reference lines separated by blank lines, one group per hypothesis."""
    groups = [[]]
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                groups[-1].append(line)
            elif groups[-1]:
                groups.append([])
    return groups if groups[-1] else groups[:-1]


def write_multi_references(path, refs: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join(r.replace("\n", " ").strip() for r in group) for group in refs))
        f.write("\n")


def read_references(path) -> list[list[str]]:
    """References from multi-reference text, or from an E2E CSV (mr,ref) grouped by MR in order of
    first appearance."""
    if Path(path).suffix.lower() == ".csv":
        return [group for _, group in group_references(load_e2e_split(path))]
    return read_multi_references(path)


# =============================================================================
# Command line
# =============================================================================


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score E2E NLG outputs with the official metrics.")
    parser.add_argument("--refs", required=True,
                        help="references: text with one group of lines per output, groups "
                             "separated by a blank line; or an E2E CSV with mr,ref columns")
    parser.add_argument("--hyps", help="system outputs, one line per MR in the references' order")
    return parser


def main(argv=None) -> dict:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
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
