import pytest

from dqtool.errors import DQToolError
from dqtool.metrics import bleu, rouge, score, split_sentences


def test_rouge_hand_computed():
    # Row 1: pred "the cat sat" vs ref "the cat sat down".
    #   ROUGE-1: 3 shared unigrams, P = 3/3, R = 3/4, F = 2PR/(P+R) = 6/7 = 0.857143
    #   ROUGE-2: pred bigrams {the cat, cat sat}, ref adds {sat down}: P = 2/2, R = 2/3, F = 0.8
    #   ROUGE-L: LCS = 3 -> same as ROUGE-1.
    # Row 2: no shared words -> 0. Means over the two rows are halved.
    r = rouge(["the cat sat", "a dog barked"], ["the cat sat down", "the cat sat down"])
    assert r["rouge1"] == pytest.approx(100 * 6 / 7 / 2, abs=1e-3)
    assert r["rouge2"] == pytest.approx(100 * 0.8 / 2, abs=1e-3)
    assert r["rougeL"] == pytest.approx(100 * 6 / 7 / 2, abs=1e-3)


def test_rouge_uses_stemming_and_lsum_uses_sentences():
    # With the Porter stemmer "cats"/"cat" and "running"/"run" match: F = 1.
    assert rouge(["cats running"], ["cat run"])["rouge1"] == pytest.approx(100.0)
    # Lsum: union LCS over sentences. Swapped sentences keep Lsum at 100 while plain L drops.
    r = rouge(["b c d. a x y."], ["a x y. b c d."])
    assert r["rougeLsum"] == pytest.approx(100.0) and r["rougeL"] < 100


def test_bleu_hand_computed():
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat": equal length (BP = 1);
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3 -> BLEU = (5/6*3/5*1/2*1/3)^(1/4) = 0.537285
    b = bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert b["bleu"] == pytest.approx(53.7285, abs=1e-3)
    assert bleu(["identical words here ok"], ["identical words here ok"])["bleu"] == pytest.approx(100.0)
    assert 0 < b["chrf"] < 100


def test_score_selects_metrics_and_rejects_unknown():
    assert set(score(["a"], ["a"], ("bleu",))) == {"bleu", "chrf"}
    with pytest.raises(DQToolError, match="unknown metric 'meteor'"):
        score(["a"], ["a"], ("meteor",))


def test_sentence_split():
    assert split_sentences("One. Two! Three? four") == "One.\nTwo!\nThree?\nfour"
