"""benchmarks/chat_demo.py at a tiny size: every figure printed and saved, the answers without history are
to the last request alone, and the command it prints is the run it made."""
import importlib.util
import re
import shlex
from pathlib import Path

import train
from test_train_cli import read

REPO_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("chat_demo", REPO_ROOT / "benchmarks" / "chat_demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)
TINY_MODEL = "--emb-dim 16 --n-layers 1 --n-heads 2 --eval-freq 2 --eval-iter 1"


def test_chance_is_each_request_s_most_frequent_reply_and_history_is_cut_to_the_request():
    def conversation(request, reply):
        messages = [{"role": "user", "content": "Sort\ncab"}, {"role": "assistant", "content": "abc"},
                    {"role": "user", "content": request}, {"role": "assistant", "content": reply}]
        return {"messages": messages, "follow_up": request}
    entries = [conversation("How many letters?", "3"), conversation("How many letters?", "3"),
               conversation("How many letters?", "4"), conversation("Reverse it", "cba")]
    assert demo.chance_by_request(entries) == {"How many letters?": 2 / 3, "Reverse it": 1.0}
    assert demo.overall(demo.chance_by_request(entries), entries) == 3 / 4
    assert demo.without_history(entries[3])["messages"] == entries[3]["messages"][-2:]
    rates = demo.scores_by_request(entries, ["3", " 4 ", "4", "abc"])   # whitespace stripped
    assert rates == {"How many letters?": 2 / 3, "Reverse it": 0.0}


def test_the_demo_reports_every_figure_with_and_without_the_conversation(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    assert demo.main(["--steps", "3", "--batch-size", "4", "--n-test", "25", "--model-flags", TINY_MODEL,
                      "--out-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    summary = read(run_dir / "chat-demo.json")
    answered = [e for e in read(run_dir / "test-responses.json") if "messages" in e]
    assert summary["conversations"] == len(answered) == 5 and summary["steps"] == 3
    assert summary["with"] == demo.scores_by_request(answered, [e["model_response"] for e in answered])
    assert set(summary["without"]) == set(summary["chance"]) == set(summary["with"])
    assert summary["overall"]["chance"] == demo.overall(demo.chance_by_request(answered), answered)
    for request, rate in summary["with"].items():
        line = re.search(rf"^{re.escape(request)} +\d+ +(\S+) +(\S+) +(\S+)$", out, re.M)
        assert line and line.group(1) == f"{rate:.1%}", request
    assert re.search(r"^with the conversation: [\d.]+% \(goal >= 95%: (met|MISSED)\); without it", out, re.M)
    assert re.search(r"^goals: (all met|MISSED)$", out, re.M)
    command = shlex.split(re.search(r"^equivalent: (.*)$", out, re.M).group(1))
    assert command[:2] == ["python", "train.py"] and summary["command"] == shlex.join(command)
    again = tmp_path / "again"
    command[command.index("--out-dir") + 1] = str(again)
    assert train.main(command[2:]) == 0                                    # the same run, from train.py
    assert read(again / "metrics.json")["exact_match_by_task"] == read(run_dir / "metrics.json")[
        "exact_match_by_task"]
