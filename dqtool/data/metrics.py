"""Quality metrics: ROUGE (rouge-score) and BLEU / chrF (sacrebleu), all offline.

ROUGE is the F-measure x100 averaged over rows, with Porter stemming as in the BART
and DQ-BART papers. ROUGE-Lsum needs one sentence per line; nltk's punkt model is
not available offline, so sentences are split with a small regex (end punctuation
followed by white space). It agrees with punkt on ordinary prose but also splits after
abbreviations ("e.g. x", "Dr. Smith"); that only moves ROUGE-Lsum, never 1/2/L.
BLEU and chrF are sacrebleu's corpus-level scores with its default settings (BLEU:
13a tokenization, case-sensitive, ``exp`` smoothing; chrF: character 6-grams, beta 2).

rouge-score's tokenizer keeps only ``[a-z0-9]`` after lowercasing, so ROUGE of text in
non-Latin scripts is meaningless (all tokens vanish); that matches how the BART and
DQ-BART papers score English summaries. Score translation (mBART, Marian) with BLEU/chrF.

The mean over rows equals the "mid" of the bootstrap aggregate that Hugging Face's
``rouge`` metric (used by the DQ-BART code) reports, up to resampling noise.
"""

from __future__ import annotations

import re

from dqtool.base.errors import DQToolError

METRICS = ("rouge", "bleu")
_SENT_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line, for ROUGE-Lsum.

    Example:
        >>> split_sentences("It works. Does it? Yes!")
        'It works.\\nDoes it?\\nYes!'
    """
    return "\n".join(s for s in _SENT_END.split(text.strip()) if s)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure x100.

    Example:
        >>> rouge(["the cat sat"], ["the cat sat"])["rougeL"]
        100.0
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}
    for p, r in zip(predictions, references):
        s = scorer.score(split_sentences(r), split_sentences(p))
        for k in totals:
            totals[k] += s[k].fmeasure
    n = max(len(predictions), 1)
    return {k: round(100 * v / n, 4) for k, v in totals.items()}


def bleu(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults).

    Example:
        >>> bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"]
        100.0
    """
    import sacrebleu

    b = sacrebleu.corpus_bleu(predictions, [references])
    c = sacrebleu.corpus_chrf(predictions, [references])
    return {"bleu": round(b.score, 4), "chrf": round(c.score, 4)}


def score(predictions: list[str], references: list[str], metrics=METRICS) -> dict[str, float]:
    """All requested metrics in one dict.

    Example:
        >>> sorted(score(["a b"], ["a b"], metrics=("rouge",)))
        ['rouge1', 'rouge2', 'rougeL', 'rougeLsum']
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise DQToolError(f"unknown metric {unknown[0]!r}: choose from {', '.join(METRICS)}")
    out: dict[str, float] = {}
    if "rouge" in metrics:
        out.update(rouge(predictions, references))
    if "bleu" in metrics:
        out.update(bleu(predictions, references))
    return out
