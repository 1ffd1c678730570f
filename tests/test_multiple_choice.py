"""Log-likelihood scoring of multiple-choice questions: the numbers against a plain computation from the
model's logits (both ways of batching), the three conventions' picks, chance and its range."""
import math

import numpy as np
import pytest

from minigpt import GPTConfig, GPTModel
from minigpt.evaluate import multiple_choice
from minigpt.evaluate.multiple_choice import (Question, Scores, chance, encode_question, picks,
                                              score_questions, summarize)
from minigpt.tokenizer import byte_tokenizer, encode

TOKENIZER = byte_tokenizer()
CONFIG = GPTConfig(vocab_size=257, context_length=24, emb_dim=16, n_heads=2, n_layers=2)
QUESTIONS = [
    Question("The cat sat on", ("the mat", "a hat", "x"), 0, group="animals"),
    Question("Hi", ("there", "you all", "y", "zz"), 2, group="greetings"),
    Question("Pick one:", ("A", "B", "C", "D"), 3, group="letters"),              # one-token continuations
    Question("a" * 40, ("bb", "c"), 1, group="long"),                              # the context is cut
    Question("", ("nothing before", "it"), 0, delimiter="", group="empty"),        # <|endoftext|> context
]


@pytest.fixture(scope="module")
def model():
    return GPTModel(CONFIG, seed=3, dtype=np.float64)


def plain_logprobs(model, question):
    """Each choice alone: the whole sequence through the model, log_softmax of its logits written out, and
    the continuation's tokens' log-probabilities summed at the positions that predict them."""
    continuations = [encode(TOKENIZER, question.delimiter + choice) for choice in question.choices]
    context = encode(TOKENIZER, question.context) or [TOKENIZER.eot_token]
    room = CONFIG.context_length + 1 - max(map(len, continuations))     # the last token is never read
    context = context[max(0, len(context) - room):]
    sums = []
    for ids in continuations:
        logits = model(np.array([context + ids[:-1]])).data[0]                    # (T, V)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # (T, V)
        sums.append(sum(log_probs[len(context) - 1 + j, token] for j, token in enumerate(ids)))
    return np.array(sums)


@pytest.mark.parametrize("share_context", [True, False])
def test_log_likelihoods_equal_a_plain_computation_from_the_logits(model, share_context):
    scores = score_questions(model, TOKENIZER, QUESTIONS, share_context=share_context, progress=False)
    for question, logprobs in zip(QUESTIONS, scores.logprobs):
        np.testing.assert_allclose(logprobs, plain_logprobs(model, question), rtol=1e-10)
    assert [counts.tolist() for counts in scores.token_counts][:2] == [[8, 6, 2], [6, 8, 2, 3]]  # " " + it
    assert scores.cut == 1


@pytest.mark.parametrize("share_context", [True, False])
def test_many_small_batches_give_the_numbers_of_one_big_one(model, monkeypatch, share_context):
    rng = np.random.default_rng(0)
    questions = [Question("".join(rng.choice(list("abcdefgh"), size=int(rng.integers(1, 15)))),
                          tuple("".join(rng.choice(list("xyz"), size=int(rng.integers(1, 6))))
                                for _ in range(int(rng.integers(2, 5)))), 0) for _ in range(30)]
    whole = score_questions(model, TOKENIZER, questions, share_context, progress=False)
    monkeypatch.setattr(multiple_choice, "MAX_ROWS", 5)
    encoded = [encode_question(TOKENIZER, q, CONFIG.context_length) for q in questions]
    assert len(multiple_choice.question_batches(encoded, CONFIG, share_context)) > 10
    pieces = score_questions(model, TOKENIZER, questions, share_context, progress=False)
    for a, b in zip(whole.logprobs, pieces.logprobs):
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_a_float32_model_scores_the_same_either_way():
    model = GPTModel(CONFIG, seed=4)
    shared, separate = (score_questions(model, TOKENIZER, QUESTIONS, share, progress=False).logprobs
                        for share in (True, False))
    for a, b in zip(shared, separate):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_encode_question_keeps_the_end_of_a_long_context():
    context, continuations, cut = encode_question(TOKENIZER, Question("0123456789", ("abc", "d"), 0), 8)
    assert continuations == [list(b" abc"), list(b" d")]
    assert context == list(b"56789") and cut           # 8 + 1 - 4 = 5 tokens of context remain
    short = encode_question(TOKENIZER, Question("0123", ("abc",), 0), 8)
    assert short == (list(b"0123"), [list(b" abc")], False)
    with pytest.raises(ValueError, match="a choice of 9 tokens does not fit the model's context of 8"):
        encode_question(TOKENIZER, Question("x", ("abcdefgh", "i"), 0), 8)


def test_acc_norm_picks_differ_from_acc_exactly_where_the_lengths_make_them():
    # log-likelihoods of a long and a short choice; the short one is likelier in total
    question = Question("Q", ("bbbbbb", "aa"), 0)
    scores = np.array([-4.0, -3.0])
    #                 acc: -4 < -3 -> 1; per character: -4/6 > -3/2 -> 0; per token: -4/2 < -3/1 -> 0
    assert picks(question, scores, np.array([2, 1])) == {"acc": 1, "acc_norm_chars": 0, "acc_norm_tokens": 0}
    #                 per token with 8 and 1 tokens: -0.5 > -3 -> 0 too; with 1 and 1: the same as acc
    assert picks(question, scores, np.array([1, 1]))["acc_norm_tokens"] == 1
    # equal character lengths: acc_norm_chars is acc, whatever the scores
    same_length = Question("Q", ("ab", "cd", "ef"), 2)
    for logprobs in np.random.default_rng(1).normal(size=(50, 3)) * 5:
        picked = picks(same_length, logprobs, np.array([1, 2, 3]))
        assert picked["acc_norm_chars"] == picked["acc"] == int(np.argmax(logprobs))


def test_the_conventions_disagree_only_on_questions_whose_choices_differ_in_length(model):
    questions = [Question("x", ("abc", "abd", "bbc"), 0), Question("y", ("a", "bbbbbbbbbbbb"), 1),
                 Question("z", ("pq", "rs"), 1), Question("w", ("q", "rrrrrrrr", "ss"), 2)]
    scores = score_questions(model, TOKENIZER, questions, progress=False)
    for question, logprobs, counts in zip(questions, scores.logprobs, scores.token_counts):
        picked = picks(question, logprobs, counts)
        if len({len(choice) for choice in question.choices}) == 1:   # one length (bytes: chars = tokens - 1)
            assert picked["acc"] == picked["acc_norm_chars"] == picked["acc_norm_tokens"]
        lengths = np.array([len(choice) for choice in question.choices])
        assert picked["acc_norm_chars"] == int(np.argmax(logprobs / lengths))
        assert picked["acc_norm_tokens"] == int(np.argmax(logprobs / (lengths + 1)))  # + the delimiter


def test_chance_and_the_range_of_a_guesser_by_hand():
    expected, (low, high) = chance([4, 4, 4, 4])
    spread = 1.96 * math.sqrt(4 * 0.25 * 0.75) / 4                  # sqrt(sum p(1-p)) / n
    assert expected == 0.25 and low == 0.0 and high == pytest.approx(0.25 + spread)
    expected, (low, high) = chance([2] * 100 + [4] * 100)
    spread = 1.96 * math.sqrt(100 * 0.25 + 100 * 0.1875) / 200
    assert expected == pytest.approx(0.375) and (low, high) == pytest.approx((0.375 - spread, 0.375 + spread))


def test_summarize_counts_each_convention_per_group_and_overall():
    questions = [Question("Q", ("bbbbbb", "aa"), 0, group="g1"), Question("Q", ("x", "y"), 1, group="g1"),
                 Question("Q", ("long answer", "no"), 1, group="g2")]
    scores = Scores([np.array([-4.0, -3.0]), np.array([-2.0, -1.0]), np.array([-5.0, -3.0])],
                    [np.array([2, 1]), np.array([1, 1]), np.array([3, 1])], cut=0, seconds=1.0)
    result = summarize(questions, scores)
    # picks: q1 acc 1 (wrong), norms 0 (right); q2 all 1 (right); q3 acc 1 (right), chars -5/11 > -3/2 -> 0,
    # tokens -5/3 > -3 -> 0 (wrong)
    assert (result["acc"], result["acc_norm_chars"], result["acc_norm_tokens"]) == (2 / 3, 2 / 3, 2 / 3)
    assert result["groups"]["g1"] == {"questions": 2, "acc": 0.5, "acc_norm_chars": 1.0,
                                      "acc_norm_tokens": 1.0}
    assert result["groups"]["g2"]["acc"] == 1.0 and result["groups"]["g2"]["acc_norm_chars"] == 0.0
    assert result["chance"] == 0.5 and result["questions"] == 3
    assert result["per_question"][0]["picked"] == {"acc": 1, "acc_norm_chars": 0, "acc_norm_tokens": 0}
