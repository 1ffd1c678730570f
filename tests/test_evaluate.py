"""Scoring responses: ROUGE-L and exact match by hand, the Ollama judge against a fake server, the CLI."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minigpt.evaluate.__main__ import main
from minigpt.evaluate.judge import JudgeUnavailable, judge_responses, parse_score
from minigpt.evaluate.scores import exact_match, lcs_length, rouge_l_f1, score_responses
from minigpt.pipeline import steps
from minigpt.prompts import format_input

REPO = Path(__file__).resolve().parents[1]
ENTRIES = [
    {"instruction": "Rewrite the sentence.", "input": "The cat is on the mat.",
     "output": "The cat is on the mat.", "model_response": "The cat sat on the mat."},
    {"instruction": "Convert 45 kilometers to meters.", "input": "",
     "output": "45 kilometers is 45000 meters.", "model_response": "  45 kilometers is 45000 meters.\n"},
]


# ---------------------------------------------------------------------------------------------
# ROUGE-L and exact match

def plain_lcs_length(a, b):
    """The dynamic programme lcs_length replaces, as it was: L[i][j] = L[i-1][j-1] + 1 if a[i] == b[j],
    else max(L[i-1][j], L[i][j-1]), one row at a time."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def test_lcs_length():
    assert lcs_length("abcbdab", "bdcaba") == 4  # the textbook example (CLRS): "bcba"
    assert lcs_length([], ["a"]) == 0 and lcs_length(["a"], ["a"]) == 1 and lcs_length(["a"], []) == 0


def test_lcs_length_equals_the_plain_dynamic_programme():
    rng = np.random.default_rng(0)
    for _ in range(300):
        vocabulary = int(rng.integers(1, 8))                       # few words: many matches and ties
        a, b = (rng.integers(0, vocabulary, size=int(rng.integers(0, 90))).tolist() for _ in range(2))
        assert lcs_length(a, b) == plain_lcs_length(a, b), (a, b)
    words = "the cat sat on a mat and it was very happy indeed".split()
    a, b = (rng.choice(words, size=700).tolist() for _ in range(2))   # rows longer than 64 bits
    assert lcs_length(a, b) == plain_lcs_length(a, b)


def test_lcs_length_compares_words_a_number_of_times_linear_in_their_count():
    """The plain table compares every word of one text with every word of the other: 9 s for two 8,000-word
    responses. Counted, not timed: the words are looked up, so comparisons grow with len(a) + len(b)."""
    comparisons = 0

    class Word(str):
        def __eq__(self, other):
            nonlocal comparisons
            comparisons += 1
            return str.__eq__(self, other)
        __hash__ = str.__hash__

    rng = np.random.default_rng(1)
    a, b = ([Word(f"w{i}") for i in rng.integers(0, 50, size=400)] for _ in range(2))
    assert lcs_length(a, b) == plain_lcs_length(list(map(str, a)), list(map(str, b)))
    assert comparisons <= 2 * (len(a) + len(b))        # the table would make 400 x 400 = 160,000


@pytest.mark.parametrize("prediction, reference, expected", [
    # 6 words each; LCS "the cat on the mat" = 5: P = R = 5/6, F1 = 5/6
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
    # 4 vs 5 words; LCS "quick brown" = 2: P = 2/4, R = 2/5, F1 = 2*(1/2)(2/5)/(9/10) = 4/9
    ("A quick brown fox", "the quick brown dog jumps", 4 / 9),
    # a subsequence, not a substring: LCS "a b c" = 3 of 5 and 3: P = 3/5, R = 1, F1 = 1.2/1.6 = 3/4
    ("a x b y c", "a b c", 3 / 4),
    # order matters: LCS of "b a" and "a b" is 1: P = R = 1/2
    ("b a", "a b", 1 / 2),
    # case and punctuation are ignored: both are [hello, world]
    ("Hello, World!", "hello world", 1.0),
    ("abc", "xyz", 0.0),
    ("", "", 1.0), ("...", "!?", 1.0),  # no words on either side: identical
    ("", "something", 0.0), ("something", "", 0.0),
])
def test_rouge_l_f1_by_hand(prediction, reference, expected):
    assert rouge_l_f1(prediction, reference) == pytest.approx(expected)


def test_exact_match():
    assert exact_match(" 45 meters\n", "45 meters")
    assert not exact_match("45 meters.", "45 meters")
    assert not exact_match("Yes", "yes")  # exact: case counts


def test_score_responses():
    scores = score_responses(ENTRIES)
    # entry 0: words "the cat sat on the mat" vs "the cat is on the mat": 5/6; entry 1: identical after strip
    assert scores["count"] == 2
    assert scores["rouge_l_f1"] == pytest.approx((5 / 6 + 1) / 2)
    assert scores["exact_match"] == 0.5
    assert [s["exact_match"] for s in scores["per_entry"]] == [False, True]


# ---------------------------------------------------------------------------------------------
# The judge against a fake Ollama server

def test_parse_score():
    assert parse_score("85") == 85
    assert parse_score("Score: 120 (very good)") == 100  # clamped
    assert parse_score("-5") == 0
    assert parse_score("excellent") is None


def test_judge_sends_the_reference_prompt_and_parses_scores(ollama):
    ollama["replies"] = ["85", "Score: 120"]
    result = judge_responses(ENTRIES, model="llama3", url=ollama["url"], timeout=5)
    assert result["scores"] == [85, 100] and result["mean_score"] == 92.5 and result["scored"] == 2
    path, request = ollama["requests"][0]
    assert path == "/api/chat"
    assert request["model"] == "llama3" and request["stream"] is False
    assert request["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    assert request["messages"] == [{"role": "user", "content": (
        f"Given the input `{format_input(ENTRIES[0])}` and correct output `The cat is on the mat.`, "
        "score the model response `The cat sat on the mat.` on a scale from 0 to 100, where 100 is "
        "the best score. Respond with the integer number only.")}]


def test_judge_skips_unparsable_replies_with_a_warning(ollama, capsys):
    ollama["replies"] = ["I like it", "60"]
    result = judge_responses(ENTRIES, url=ollama["url"], timeout=5)
    assert result["scores"] == [None, 60] and result["mean_score"] == 60 and result["scored"] == 1
    assert "warning: judge reply for entry 0 has no score" in capsys.readouterr().err


@pytest.mark.parametrize("content", [85, None, 85.5, ["85"], {"score": 85}, True])
def test_judge_counts_a_reply_that_is_not_text_as_unparsable(ollama, capsys, content):
    ollama["replies"] = [content, "60"]
    result = judge_responses(ENTRIES, url=ollama["url"], timeout=5)
    assert result["scores"] == [None, 60] and result["mean_score"] == 60 and result["scored"] == 1
    assert f"warning: judge reply for entry 0 has no score, skipped: {content!r}" in capsys.readouterr().err


def test_a_trickling_server_is_cut_off_at_the_deadline(ollama):
    """The fake sends a byte every 0.1 s: each read is quick, but the whole reply would take ~12 s."""
    ollama["trickle"] = 0.1
    start = time.monotonic()
    with pytest.raises(JudgeUnavailable) as info:
        judge_responses(ENTRIES, url=ollama["url"], timeout=1)
    assert time.monotonic() - start < 5
    assert str(info.value) == (f"the Ollama server at {ollama['url']} sent no complete reply within 1 s; "
                               f"a model that is slow to load may need a longer --judge-timeout")


@pytest.mark.parametrize("body, message", [
    (b"[" * 100_000 + b"]" * 100_000, "did not answer like an Ollama server"),
    (b"not json", "did not answer like an Ollama server: b'not json'"),
])
def test_a_reply_that_is_not_ollama_json_is_one_line(ollama, body, message):
    ollama["raw"] = body
    with pytest.raises(JudgeUnavailable, match=message):
        judge_responses(ENTRIES, url=ollama["url"], timeout=5)


def test_an_ollama_url_that_is_not_http_is_refused():
    with pytest.raises(JudgeUnavailable, match="'localhost:11434' is not an http:// address"):
        judge_responses(ENTRIES, url="localhost:11434", timeout=5)


def test_judge_unavailable_says_how_to_start_ollama(closed_url):
    with pytest.raises(JudgeUnavailable) as info:
        judge_responses(ENTRIES, url=closed_url, timeout=5)
    message = str(info.value)
    assert message.startswith(f"no Ollama server answered at {closed_url}")
    assert "ollama serve" in message and "\n" not in message


def test_judge_model_missing_on_server(ollama):
    ollama["status"] = 404
    message = r"refused the request \(HTTP 404: .*not found.*`ollama pull nope`"
    with pytest.raises(JudgeUnavailable, match=message):
        judge_responses(ENTRIES, model="nope", url=ollama["url"], timeout=5)


# ---------------------------------------------------------------------------------------------
# Command line

@pytest.fixture
def responses_file(tmp_path):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(ENTRIES))
    return path


def test_cli_prints_scores_and_writes_metrics(responses_file, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main([str(responses_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ROUGE-L F1   0.917" in printed and "exact match  50.0%" in printed  # (5/6 + 1)/2 = 0.9167
    metrics = json.loads(out.read_text())
    assert metrics["count"] == 2 and metrics["judge"] is None and len(metrics["per_entry"]) == 2


def test_cli_with_judge(responses_file, ollama, capsys):
    ollama["replies"] = ["70", "90"]
    assert main([str(responses_file), "--judge-model", "llama3", "--ollama-url", ollama["url"]]) == 0
    assert "judge (llama3)  80.0 / 100 over 2 scored responses" in capsys.readouterr().out


def test_cli_judge_timeout_flag_and_replies_that_are_not_text(responses_file, ollama, tmp_path, capsys):
    ollama["replies"] = [None, 7]
    out = tmp_path / "metrics.json"
    assert main([str(responses_file), "--judge-model", "llama3", "--ollama-url", ollama["url"],
                 "--judge-timeout", "5", "--out", str(out)]) == 0
    assert "judge (llama3)  n/a / 100 over 0 scored responses" in capsys.readouterr().out
    assert json.loads(out.read_text())["judge"]["scores"] == [None, None]
    ollama["trickle"] = 0.1
    start = time.monotonic()
    assert main([str(responses_file), "--judge-model", "llama3", "--ollama-url", ollama["url"],
                 "--judge-timeout", "0.5"]) == 0
    assert time.monotonic() - start < 5
    assert "skipping the LLM judge: the Ollama server" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_cli_judge_timeout_must_be_positive_seconds(responses_file, capsys, value):
    assert main([str(responses_file), "--judge-timeout", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --judge-timeout: ") and err.count("\n") == 1
    assert f"--judge-timeout: {value!r} is not a positive number of seconds" in err


@pytest.mark.parametrize("argv", [[], ["a.json", "--no-such-flag"], ["a.json", "b.json"]])
def test_cli_usage_errors_are_one_line(capsys, argv):
    """As in train.py and generate.py: one 'error:' line and exit code 2, not argparse's usage lines."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "usage:" not in err


def test_training_runs_keep_their_metrics_when_the_judge_replies_badly(ollama):
    """train.py scores through steps.score: a reply that is not text must not lose metrics.json."""
    ollama["replies"] = [85, "70"]
    metrics = steps.score(ENTRIES, "llama3", ollama["url"], judge_timeout=5, log=lambda line: None)
    assert metrics["judge"]["scores"] == [None, 70] and metrics["count"] == 2
    ollama["trickle"] = 0.1
    start, lines = time.monotonic(), []
    metrics = steps.score(ENTRIES, "llama3", ollama["url"], judge_timeout=0.5, log=lines.append)
    assert time.monotonic() - start < 5 and metrics["judge"] is None
    assert any(line.startswith("skipping the LLM judge: the Ollama server") for line in lines)


def test_cli_judge_unavailable_still_scores(responses_file, closed_url, capsys):
    assert main([str(responses_file), "--judge-model", "llama3", "--ollama-url", closed_url]) == 0
    printed = capsys.readouterr().out
    assert f"skipping the LLM judge: no Ollama server answered at {closed_url}" in printed
    assert "ROUGE-L F1" in printed


@pytest.mark.parametrize("content, message", [
    (None, "error: responses file not found: "),
    ("[{", "invalid JSON at line 1, column 3"),
    (json.dumps([{"output": "a"}]), "entry 0 is missing the key 'model_response'"),
])
def test_cli_bad_file_exits_2_with_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "responses.json"
    if content is not None:
        path.write_text(content)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_judge_needs_instructions(tmp_path, capsys):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps([{"output": "a", "model_response": "a"}]))
    assert main([str(path), "--judge-model", "llama3"]) == 2
    assert "entry 0 is missing the key 'instruction'" in capsys.readouterr().err


def test_cli_as_a_module_never_prints_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minigpt.evaluate", str(tmp_path / "missing.json")],
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("error: responses file not found") and "Traceback" not in result.stderr
