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

    Dynamic programming over prefixes: L[i][j] = L[i-1][j-1] + 1 if a[i] == b[j], else
    max(L[i-1][j], L[i][j-1]); kept one row at a time, O(len(a) * len(b)) time, O(len(b)) memory.
    """
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


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
