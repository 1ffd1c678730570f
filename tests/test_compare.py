"""Two models judged side by side, against a fake Ollama server (tests/conftest.py): each decision path, the
order swap, the win rate and its bootstrap interval, position bias, a server that dies midway, the CLI, and
the offline demonstration (benchmarks/compare_demo.py)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import train
from minigpt.evaluate.__main__ import main
from minigpt.evaluate.compare import (BOOTSTRAP_SAMPLES, compare_responses, load_pairs, pair_prompt,
                                      parse_verdict, summarize)
from minigpt.evaluate.judge import JudgeUnavailable
from minigpt.prompts import format_input
from test_train_cli import TINY

REPO_ROOT = Path(__file__).resolve().parents[1]


def pair(i, one, two):
    return {"instruction": f"Say {i}.", "input": "", "output": f"{i}", "model 1 response": one,
            "model 2 response": two}


PAIRS = [pair(0, "0", "zero"), pair(1, "one", "1"), pair(2, "2", "two"), pair(3, "3", "3 "),
         pair(4, "4", "x")]


@pytest.mark.parametrize("reply, verdict", [
    ("A", "A"), (" b.", "B"), ("**A**", "A"), ("[[B]]", "B"), ("Response B is better.", "B"),
    ("Response A is better than response B", None), ("I cannot decide", None), ("AB", None), (7, None),
    (None, None)])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_each_decision_path_and_the_order_swap(ollama):
    # pair 0: both orders pick model 1 (A, then B)            -> model 1 wins
    # pair 1: both orders pick model 2 (B, then A)            -> model 2 wins
    # pair 2: the first position both times (A, A)            -> tie
    # pair 3: the same text from both models                  -> tie, never asked
    # pair 4: a reply without a verdict                       -> undecided
    ollama["replies"] = ["A", "B", "B", "A", "A", "A", "no idea", "A"]
    result = compare_responses(PAIRS, "judge", ollama["url"], timeout=5)
    assert [r["outcome"] for r in result["per_pair"]] == ["model 1", "model 2", "tie", "tie", "undecided"]
    assert (result["wins"], result["ties"], result["losses"], result["undecided"]) == (1, 2, 1, 1)
    assert result["win_rate"] == (1 + 2 * 0.5) / 4 and result["complete"] and result["pairs"] == 5
    assert result["first_position_rate"] == 5 / 7 and result["verdicts"] == 7   # A in 5 of the 7 verdicts
    assert result["orders_agreed"] == 2
    prompts = [request["messages"][0]["content"] for _, request in ollama["requests"]]
    assert len(prompts) == 8                                                     # pair 3 was not asked
    assert prompts[1] == pair_prompt(PAIRS[0], "zero", "0")                     # the order swapped
    assert prompts[0] == (f"Given the input `{format_input(PAIRS[0])}` and correct output `0`, which of two "
                          "responses is better?\nResponse A: `0`\nResponse B: `zero`\n"
                          "Respond with the single letter A or B only.")


def test_a_reply_without_a_verdict_is_left_out_with_a_warning(ollama, capsys):
    ollama["replies"] = ["A", 42]
    result = compare_responses(PAIRS[:1], "judge", ollama["url"], timeout=5)
    assert result["undecided"] == 1 and result["win_rate"] is None and result["win_rate_95"] == [None, None]
    assert "warning: no verdict from the judge for pair 0, left out: ('A', None)" in capsys.readouterr().err


def test_a_server_that_dies_midway_leaves_the_pairs_judged_so_far(ollama, capsys):
    ollama["replies"] = ["A", "B", "B"]
    ollama["dead_after"] = 3             # pair 0 is judged; pair 1 loses its second answer
    result = compare_responses(PAIRS, "judge", ollama["url"], timeout=5)
    assert not result["complete"] and result["pairs"] == 1 and result["wins"] == 1
    err = capsys.readouterr().err
    assert "warning: the judge stopped answering at pair 1 of 5" in err and "the 1 pairs judged" in err


def test_a_server_that_never_answers_is_an_error(closed_url):
    with pytest.raises(JudgeUnavailable, match="no Ollama server answered"):
        compare_responses(PAIRS, "judge", closed_url, timeout=5)


def test_the_bootstrap_interval_holds_the_win_rate_and_is_seeded():
    records = ([{"verdicts": ["A", "B"], "outcome": "model 1"}] * 30
               + [{"verdicts": ["A", "A"], "outcome": "tie"}] * 10
               + [{"verdicts": ["B", "A"], "outcome": "model 2"}] * 20)
    result = summarize(records, seed=1)
    low, high = result["win_rate_95"]
    assert result["win_rate"] == pytest.approx((30 + 5) / 60) and low < result["win_rate"] < high
    # the standard error of a mean of 60 scores with this spread: the interval is about +- 1.96 of it
    scores = np.array([1.0] * 30 + [0.5] * 10 + [0.0] * 20)
    assert high - low == pytest.approx(2 * 1.96 * scores.std() / np.sqrt(60), rel=0.15)
    assert summarize(records, seed=1) == result and BOOTSTRAP_SAMPLES >= 1000
    assert summarize([{"verdicts": ["A", "B"], "outcome": "model 1"}] * 5)["win_rate_95"] == [1.0, 1.0]


def test_two_files_are_paired_by_position_and_must_hold_the_same_entries(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    entries = [{"instruction": "Say 1.", "input": "", "output": "1"},
               {"instruction": "Say 2.", "output": "2"}]
    one.write_text(json.dumps([dict(e, model_response=f"a{i}") for i, e in enumerate(entries)]))
    two.write_text(json.dumps([dict(e, model_response=f"b{i}") for i, e in enumerate(entries)]))
    pairs, names, run_dir = load_pairs(one, two)
    assert [(p["model 1 response"], p["model 2 response"]) for p in pairs] == [("a0", "b0"), ("a1", "b1")]
    assert names == (str(one), str(two)) and run_dir is None
    two.write_text(json.dumps([dict(entries[1], model_response="b")]))
    with pytest.raises(ValueError, match="has 2 responses and .* 1: compare responses to the same test"):
        load_pairs(one, two)
    two.write_text(json.dumps([dict(e, model_response="b") for e in reversed(entries)]))
    with pytest.raises(ValueError, match="entry 0 differs between"):
        load_pairs(one, two)


def test_the_cli_on_rasbts_layout_prints_the_win_rate_and_position_bias(ollama, tmp_path, capsys):
    path = tmp_path / "eval-example-data.json"
    path.write_text(json.dumps(PAIRS[:2]))
    ollama["replies"] = ["A", "B", "B", "A"]
    out = tmp_path / "comparison.json"
    assert main(["compare", str(path), "--judge-model", "llama3", "--ollama-url", ollama["url"],
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 pairs: model 1 wins 1, ties 0, loses 1; undecided 0" in printed
    assert "win rate of model 1: 0.500 (95% bootstrap interval 0.000 to 1.000" in printed
    assert "the judge picked the response shown first in 50.0% of its 4 verdicts" in printed
    saved = json.loads(out.read_text())
    assert saved["model_1"] == "model 1" and saved["judge"] == "llama3" and len(saved["per_pair"]) == 2


def test_the_cli_on_two_run_folders_adds_the_comparison_to_model_1s_report(ollama, tmp_path, capsys):
    """A run folder stands for its test-responses.json; the results go into model 1's folder and report."""
    runs = []
    for name, prefix in (("a", "x"), ("b", "y")):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "config.json").write_text(json.dumps({"method": "sft", "data": "tasks"}))
        (run_dir / "test-responses.json").write_text(json.dumps(
            [{"instruction": "Say 1.", "input": "", "output": "1", "model_response": f"{prefix}1"}]))
        runs.append(run_dir)
    ollama["replies"] = ["B", "A"]
    assert main(["compare", str(runs[0]), str(runs[1]), "--judge-model", "llama3", "--ollama-url",
                 ollama["url"]]) == 0
    saved = json.loads((runs[0] / "comparison-b.json").read_text())
    assert (saved["wins"], saved["losses"]) == (0, 1)
    report = (runs[0] / "report.md").read_text()
    assert "## Side by side" in report and "0 wins / 0 ties / 1 losses" in report
    ollama["replies"] = ["A"]
    ollama["dead_after"] = 3
    assert main(["compare", str(runs[0]), str(runs[1]), "--judge-model", "llama3", "--ollama-url",
                 ollama["url"]]) == 2                            # nothing judged: an error, exit code 2
    assert capsys.readouterr().err.startswith("error: ")


def test_the_cli_exits_1_when_the_judge_stops_midway(ollama, tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(PAIRS[:3]))
    ollama["replies"] = ["A", "B"]
    ollama["dead_after"] = 2
    out = tmp_path / "partial.json"
    argv = ["compare", str(path), "--judge-model", "j", "--ollama-url", ollama["url"], "--out", str(out)]
    assert main(argv) == 1
    assert json.loads(out.read_text())["complete"] is False


@pytest.mark.parametrize("argv, message", [
    (["compare", "a.json"], "the following arguments are required: --judge-model"),
    (["compare", "missing.json", "--judge-model", "j"], "comparison file not found: missing.json"),
    (["compare", "a.json", "--judge-model", "j", "--judge-timeout", "0"],
     "argument --judge-timeout: '0' is not a positive number of seconds"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_the_offline_demo_judges_a_tiny_run_against_its_start(tmp_path, capsys):
    """benchmarks/compare_demo.py: its stand-in judge picks the one right response, else the first shown;
    asked in both orders, that is a win for the right one and a tie where neither or both are right."""
    spec = importlib.util.spec_from_file_location("demo", REPO_ROOT / "benchmarks" / "compare_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    run_dir = tmp_path / "run"
    assert train.main(TINY + ["--max-steps", "3", "--out-dir", str(run_dir)]) == 0
    assert demo.main([str(run_dir)]) == 0
    one = json.loads((run_dir / "test-responses.json").read_text())
    two = json.loads((run_dir / "test-responses-before-training.json").read_text())
    expected = []
    for a, b in zip(one, two):
        right = (a["model_response"].strip() == a["output"], b["model_response"].strip() == b["output"])
        same = a["model_response"].strip() == b["model_response"].strip()
        expected.append("tie" if same or right[0] == right[1] else "model 1" if right[0] else "model 2")
    result = json.loads((run_dir / "comparison-test-responses-before-training.json").read_text())
    assert [r["outcome"] for r in result["per_pair"]] == expected and result["pairs"] == 5
    assert "## Side by side" in (run_dir / "report.md").read_text()
