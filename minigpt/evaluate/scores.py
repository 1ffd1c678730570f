"""Automatic scores of responses against the expected outputs: exact match and ROUGE-L F1.

Both need nothing but the responses (rasbt ch. 7, section 7.7: the responses saved for review); the
LLM judge of section 7.8 is minigpt.evaluate.judge.
"""
import re

from ..data import validate_entries

RESPONSE_KEYS = ("output", "model_response")


def words(text):
    """Lowercased word tokens: maximal runs of letters and digits ("It's 45km!" -> it, s, 45km)."""
    return re.findall(r"[^\W_]+", text.lower())


def lcs_length(a, b):
    """Length of the longest common subsequence of sequences a and b.

    The dynamic programme over prefixes, L[i][j] = L[i-1][j-1] + 1 if a[i] == b[j], else
    max(L[i-1][j], L[i][j-1]), takes len(a) * len(b) Python steps: 9 s for two 8,000-word texts. Here
    each row of L is the bits of one integer (Crochemore et al. 2001, "A fast and practical bit-vector
    algorithm for the longest common subsequence problem"): bit j of V is 0 where the row steps up by one
    at column j, so the row's last value, the LCS so far, is the number of zero bits. A row costs a few
    operations on len(b)-bit integers, which Python does in C, 64 columns at a time: 0.01 s for those
    texts. tests/test_evaluate.py checks it against the plain table on random sequences.
    """
    if not a or not b:
        return 0
    matches = {}                                       # token -> bits j where b[j] is that token
    for j, token in enumerate(b):
        matches[token] = matches.get(token, 0) | (1 << j)
    all_columns = (1 << len(b)) - 1
    V = all_columns                                    # row 0: no step anywhere
    for token in a:
        U = V & matches.get(token, 0)                  # matches in columns that are not yet steps
        V = ((V + U) | (V - U)) & all_columns          # the paper's row update: new steps at those matches
    return len(b) - V.bit_count()


def rouge_l_f1(prediction, reference):
    """ROUGE-L F1 between two texts, over `words`.

    With L = LCS(prediction words, reference words): precision P = L / |prediction|,
    recall R = L / |reference|, F1 = 2PR / (P + R). Both empty -> 1.0; exactly one empty -> 0.0.
    """
    predicted, expected = words(prediction), words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = lcs_length(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction, reference):
    """True when the texts are equal after stripping surrounding whitespace."""
    return prediction.strip() == reference.strip()


def score_responses(entries):
    """Mean ROUGE-L F1 and exact-match rate over `entries`, plus the per-entry scores."""
    validate_entries(entries, RESPONSE_KEYS, source="responses")
    per_entry = [{"rouge_l_f1": rouge_l_f1(e["model_response"], e["output"]),
                  "exact_match": exact_match(e["model_response"], e["output"])} for e in entries]
    n = len(per_entry)
    return {"count": n,
            "rouge_l_f1": sum(s["rouge_l_f1"] for s in per_entry) / n,
            "exact_match": sum(s["exact_match"] for s in per_entry) / n,
            "per_entry": per_entry}
