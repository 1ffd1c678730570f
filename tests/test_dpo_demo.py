"""benchmarks/dpo_demo.py on a tiny default run: the pairs (right answer chosen, the model's own wrong
answer or a near miss rejected) land in the splits they were made for, every figure is printed and
saved, and the train.py command it prints runs the same configuration."""
import importlib.util
import re
import shlex
from pathlib import Path

import numpy as np

import train
from minigpt import tasks
from minigpt.data import split_data
from minigpt.pipeline.settings import RunConfig
from minigpt.data import expected_reply
from test_train_cli import TINY, read

REPO_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("dpo_demo", REPO_ROOT / "benchmarks" / "dpo_demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)
SIZES = ["--n-train", "200", "--n-val", "6", "--n-test", "10"]  # 85 / 10 / 5 pairs


def test_near_misses_are_wrong_and_close():
    rng = np.random.default_rng(1)
    for kind in tasks.KINDS:
        for _ in range(200):
            entry = tasks.make_example(kind, rng)
            wrong, right = tasks.near_miss(entry, rng), expected_reply(entry)   # a conversation's last reply
            assert wrong != right, entry
            if right.isdigit():
                assert abs(int(wrong) - int(right)) == 1
            else:
                differ = [i for i, (a, b) in enumerate(zip(wrong, right)) if a != b]
                assert len(wrong) == len(right) and len(differ) in (1, 2), (entry, wrong)
                if len(differ) == 2:                                    # two neighbours swapped ...
                    i = differ[0]
                    assert differ[1] == i + 1 and wrong[i:i + 2] == right[i + 1] + right[i], (entry, wrong)
                else:                                                   # ... or one letter, same case
                    assert wrong[differ[0]].isupper() == right[differ[0]].isupper(), (entry, wrong)


def test_pairs_reject_the_model_s_own_mistakes_and_land_in_their_splits():
    train_split, val, test = tasks.make_task_splits(n_train=400, n_val=20, n_test=10)
    train_pairs, val_pairs, test_pairs = demo.pair_prompts(train_split, val, test)
    assert (len(train_pairs), len(val_pairs), len(test_pairs)) == (85, 5, 10)
    assert len({(e["instruction"], e["input"]) for e in train_pairs}) == 85     # distinct prompts
    answers = [e["output"] if i % 2 else e["output"] + "z" for i, e in enumerate(train_pairs)]  # half wrong
    pairs = demo.build_pairs(train_pairs, val_pairs, test_pairs, answers, np.random.default_rng(0), tasks)
    assert all(p["chosen"] == p["output"] != p["rejected"] for p in pairs)
    own = [p for p in pairs[:85] if p["rejected_from"] == "model"]
    assert [p["rejected"] for p in own] == [a for i, a in enumerate(answers) if i % 2 == 0]
    assert all(p["rejected_from"] == "near miss" for p in pairs[85:])    # held-out: near misses only
    train_part, val_part, test_part = split_data(pairs)
    assert [p["input"] for p in test_part] == [e["input"] for e in test]  # the run's own test prompts
    assert [p["input"] for p in val_part] == [e["input"] for e in val[:5]]
    assert len(train_part) == 85


def test_the_demo_reports_every_figure_before_and_after(tmp_path, capsys):
    sft_dir, dpo_dir = tmp_path / "default", tmp_path / "dpo"
    assert train.main(TINY + SIZES + ["--max-steps", "4", "--out-dir", str(sft_dir)]) == 0
    capsys.readouterr()
    assert demo.main([str(sft_dir), "--epochs", "1", "--batch-size", "8", "--out-dir", str(dpo_dir)]) == 0
    out = capsys.readouterr().out
    summary = read(dpo_dir / "dpo-demo.json")
    assert set(summary["before"]) == set(summary["after"]) == {*tasks.TASKS, "overall"}
    sft_metrics = read(sft_dir / "metrics.json")      # "before" is the run's own held-out score
    assert {kind: summary["before"][kind] for kind in tasks.TASKS} == sft_metrics["exact_match_by_task"]
    dpo_metrics = read(dpo_dir / "metrics.json")      # "after": the DPO run's, on the same prompts
    assert {kind: summary["after"][kind] for kind in tasks.TASKS} == dpo_metrics["exact_match_by_task"]
    assert summary["test_pairs"] == dpo_metrics["dpo"]["test"] and summary["steps"] == 10
    for kind in (*tasks.TASKS, "overall"):
        line = re.search(rf"^{kind} +(\S+) +(\S+) ", out, re.M)
        assert line and line.group(2) == f"{summary['after'][kind]:.1%}", kind
    assert re.search(r"^training pairs: 85, of which \d+ reject the model's own wrong answer", out, re.M)
    assert re.search(r"^held-out pairs: reward accuracy [\d.]+, reward margin -?[\d.]+", out, re.M)
    assert re.search(r"^goals: (all met|MISSED: .+)$", out, re.M)
    assert (tmp_path / "dpo-pairs.json").is_file()

    command = shlex.split(re.search(r"^equivalent: (.*)$", out, re.M).group(1))
    assert command[:2] == ["python", "train.py"]
    settings = vars(train.build_parser().parse_args(command[2:]))
    assert train.config_from_flags(settings) == RunConfig(**read(dpo_dir / "config.json"))


def test_a_folder_that_is_not_a_finished_run_is_one_error_line(tmp_path, capsys):
    assert demo.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a finished run folder" in err and err.count("\n") == 1
