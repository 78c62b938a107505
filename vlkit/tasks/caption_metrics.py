"""Caption metrics as the COCO caption evaluation computes them: BLEU-4 and CIDEr-D.

`ptb_tokenize` stands in for the Stanford PTBTokenizer that `pycocoevalcap` runs through Java
(``-preserveLines -lowerCase``, then the punctuation tokens removed): lower case, quotes, brackets and
sentence punctuation split off and dropped, clitics (``'s``, ``n't``, ``'re``...) split into their own
tokens. `bleu` and `cider_d` take pre-tokenised text and follow `pycocoevalcap`'s `BleuScorer` (corpus-level,
the reference length closest to each hypothesis) and `CiderScorer` (CIDEr-D: tf-idf n-gram vectors, n = 1..4,
document frequencies from the evaluated references, hypothesis counts clipped by the reference's, a Gaussian
length penalty with sigma 6, times 10) operation for operation, so the scores are the same numbers.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS: tokens removed after tokenisation
# (in upper case, so the lower-cased bracket tokens -lrb- ... stay, as they do there)
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_CLITICS = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_SPLIT_INSIDE = re.compile(r"(--|[;!?\"()\[\]{}]|:(?!\d)|(?<!\d):|,(?!\d)|(?<!\d),)")
_ABBREVIATION = re.compile(r"([a-z]\.){2,}|(mr|mrs|ms|dr|st|jr|sr|vs|etc|inc|no)\.")


def _split_token(tok: str) -> list[str]:
    head: list[str] = []
    tail: list[str] = []
    while tok[:1] in ("'", "`") and not _CLITICS.match("x" + tok):
        n = 2 if tok[:2] in ("``", "''") else 1
        head.append(tok[:n])
        tok = tok[n:]
    while tok:
        if tok.endswith("..."):
            tail.insert(0, "...")
            tok = tok[:-3]
        elif tok[-1] == "." and not _ABBREVIATION.fullmatch(tok):
            tail.insert(0, ".")
            tok = tok[:-1]
        elif tok[-1] in "'`" and not tok.endswith("n't"):
            n = 2 if tok[-2:] in ("''", "``") else 1
            tail.insert(0, tok[-n:])
            tok = tok[:-n]
        else:
            break
    mid: list[str] = []
    if tok:
        c = _CLITICS.match(tok)
        mid = [c.group(1), c.group(2)] if c else [tok]
    return head + mid + tail


def ptb_tokenize(text: str) -> str:
    """A caption as the COCO evaluation sees it: PTB tokens, lower case, punctuation tokens removed."""
    text = str(text).replace("\n", " ").lower()
    text = _SPLIT_INSIDE.sub(r" \1 ", text)
    tokens: list[str] = []
    for raw in text.split():
        for tok in _split_token(raw):
            tok = _BRACKETS.get(tok, tok)
            if tok == '"':
                tok = "''"
            if tok and tok not in PUNCTUATIONS:
                tokens.append(tok)
    return " ".join(tokens)


def _ngrams(words: list[str], n: int = 4) -> dict[tuple[str, ...], int]:
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def bleu(hypotheses: list[str], references: list[list[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised hypotheses against their references (pycocoevalcap's, option 'closest')."""
    small, tiny = 1e-9, 1e-15
    guess, correct = [0] * n, [0] * n
    testlen_total, reflen_total = 0, 0
    for hyp, refs in zip(hypotheses, references, strict=True):
        reflens: list[int] = []
        maxcounts: dict[tuple[str, ...], int] = {}
        for ref in refs:
            words = ref.split()
            reflens.append(len(words))
            for g, c in _ngrams(words, n).items():
                maxcounts[g] = max(maxcounts.get(g, 0), c)
        words = hyp.split()
        testlen = len(words)
        testlen_total += testlen
        reflen_total += min((abs(rl - testlen), rl) for rl in reflens)[1]
        for k in range(n):
            guess[k] += max(0, testlen - k)
        for g, c in _ngrams(words, n).items():
            correct[len(g) - 1] += min(maxcounts.get(g, 0), c)
    scores, acc = [], 1.0
    for k in range(n):
        acc *= float(correct[k] + tiny) / (guess[k] + small)
        scores.append(acc ** (1.0 / (k + 1)))
    ratio = (testlen_total + tiny) / (reflen_total + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider_d(hypotheses: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0) -> list[float]:
    """CIDEr-D of each tokenised hypothesis (pycocoevalcap's `Cider`); the corpus score is their mean."""
    refs_counts = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    df: dict[tuple[str, ...], float] = defaultdict(float)
    for refs in refs_counts:
        for g in {g for ref in refs for g in ref}:
            df[g] += 1
    ref_len = math.log(float(len(refs_counts)))

    def vec(counts):
        v: list[dict] = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            d = math.log(max(1.0, df.get(g, 0.0)))
            k = len(g) - 1
            v[k][g] = float(tf) * (ref_len - d)
            norm[k] += v[k][g] ** 2
            if k == 1:
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    def sim(vh, vr, nh, nr, lh, lr):
        delta = float(lh - lr)
        val = [0.0] * n
        for k in range(n):
            for g in vh[k]:
                val[k] += min(vh[k][g], vr[k][g]) * vr[k][g]
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= math.e ** (-(delta**2) / (2 * sigma**2))
        return val

    scores = []
    for hyp, refs in zip(hypotheses, refs_counts, strict=True):
        vh, nh, lh = vec(_ngrams(hyp.split(), n))
        total = [0.0] * n
        for ref in refs:
            vr, nr, lr = vec(ref)
            total = [a + b for a, b in zip(total, sim(vh, vr, nh, nr, lh, lr), strict=True)]
        scores.append(sum(total) / n / len(refs) * 10.0)
    return scores


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """CIDEr-D and BLEU-4 (×100) of raw predicted captions against raw references, both PTB-tokenised."""
    if not predictions:
        return {"cider": 0.0, "bleu4": 0.0}
    hyps = [ptb_tokenize(p) for p in predictions]
    refs = [[ptb_tokenize(r) for r in rs] for rs in references]
    ciders = cider_d(hyps, refs)
    return {"cider": 100.0 * sum(ciders) / len(ciders), "bleu4": 100.0 * bleu(hyps, refs)[3]}
