import math

import pytest

from dqtool.base.errors import DQToolError
from dqtool.data.metrics import bleu, rouge, score, split_sentences


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


def test_rouge_l_differs_from_rouge_1_on_word_order():
    # pred "cat the sat" vs ref "the cat sat":
    #   ROUGE-1: all 3 words shared -> F = 1.
    #   ROUGE-2: pred bigrams {cat the, the sat} vs ref {the cat, cat sat}: none shared -> 0.
    #   ROUGE-L: LCS is "the sat" (or "cat sat") = 2 -> P = R = 2/3, F = 2/3.
    r = rouge(["cat the sat"], ["the cat sat"])
    assert r["rouge1"] == pytest.approx(100.0)
    assert r["rouge2"] == pytest.approx(0.0)
    assert r["rougeL"] == pytest.approx(100 * 2 / 3, abs=1e-3)


def test_rouge_with_porter_stemming_hand_computed():
    # rouge-score lowercases, keeps [a-z0-9] tokens and Porter-stems tokens longer than
    # 3 characters: pred "The cats were running" -> the cat were run (4 tokens);
    # ref "the cat runs" -> the cat run (3 tokens).
    #   ROUGE-1: shared {the, cat, run} = 3: P = 3/4, R = 3/3, F = 2*(3/4)/(7/4) = 6/7.
    #   ROUGE-2: pred {the cat, cat were, were run}, ref {the cat, cat run}: 1 shared:
    #            P = 1/3, R = 1/2, F = 2*(1/6)/(5/6) = 0.4.
    #   ROUGE-L: LCS "the cat run" = 3 -> 6/7 as ROUGE-1.
    r = rouge(["The cats were running"], ["the cat runs"])
    assert r["rouge1"] == pytest.approx(100 * 6 / 7, abs=1e-3)
    assert r["rouge2"] == pytest.approx(40.0, abs=1e-3)
    assert r["rougeL"] == pytest.approx(100 * 6 / 7, abs=1e-3)
    assert rouge(["cats running"], ["cat run"])["rouge1"] == pytest.approx(100.0)


def test_rouge_lsum_uses_sentences():
    # Swapped sentences: plain ROUGE-L sees "b c d a x y" vs "a x y b c d", LCS = 3 of 6
    # -> F = 0.5; Lsum takes the union LCS per reference sentence -> every word -> 1.
    r = rouge(["b c d. a x y."], ["a x y. b c d."])
    assert r["rougeLsum"] == pytest.approx(100.0)
    assert r["rougeL"] == pytest.approx(50.0, abs=1e-3)


def test_bleu_hand_computed():
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat": equal length (BP = 1);
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3 -> BLEU = (5/6*3/5*1/2*1/3)^(1/4) = 0.537285
    b = bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert b["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25, abs=1e-3)
    assert b["bleu"] == pytest.approx(53.7285, abs=1e-3)
    assert bleu(["identical words here ok"], ["identical words here ok"])["bleu"] == pytest.approx(100.0)
    assert 0 < b["chrf"] < 100


def test_bleu_brevity_penalty_hand_computed():
    # hyp "the cat sat on the" (c = 5) vs ref "the cat sat on the mat" (r = 6): every
    # n-gram of the hyp is in the ref, precisions 5/5, 4/4, 3/3, 2/2 = 1, so BLEU is the
    # brevity penalty alone: BP = exp(1 - r/c) = exp(1 - 6/5) = exp(-0.2) = 0.818731.
    assert bleu(["the cat sat on the"], ["the cat sat on the mat"])["bleu"] == pytest.approx(
        100 * math.exp(-0.2), abs=1e-3)
    # Corpus level: lengths and n-gram counts are summed over rows before the ratio.
    # Row 1 as above, row 2 identical (4 words): c = 9, r = 10, all precisions 1.
    assert bleu(["the cat sat on the", "a b c d"], ["the cat sat on the mat", "a b c d"])["bleu"] == pytest.approx(
        100 * math.exp(1 - 10 / 9), abs=1e-3)


def test_score_selects_metrics_and_rejects_unknown():
    assert set(score(["a"], ["a"], ("bleu",))) == {"bleu", "chrf"}
    assert set(score(["a"], ["a"])) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf"}
    with pytest.raises(DQToolError, match="unknown metric 'meteor'"):
        score(["a"], ["a"], ("meteor",))
    with pytest.raises(ValueError, match="2 predictions vs 1 references"):
        score(["a", "b"], ["a"])


def test_sentence_split():
    assert split_sentences("One. Two! Three? four") == "One.\nTwo!\nThree?\nfour"
    assert split_sentences("  no end punctuation  ") == "no end punctuation"
    assert split_sentences("v1.2 is out") == "v1.2 is out"  # a dot inside a token does not split
