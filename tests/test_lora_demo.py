"""benchmarks/lora_demo.py on a tiny default run: every figure printed and saved, "before" is the
default run's own held-out score, and the train.py command it prints runs the same configuration."""
import importlib.util
import re
import shlex
from pathlib import Path

import train
from minigpt.pipeline.settings import RunConfig
from minigpt.tasks import TASKS
from test_train_cli import TINY, read

REPO_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lora_demo", REPO_ROOT / "benchmarks" / "lora_demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def test_the_demo_reports_every_figure_before_and_after(tmp_path, capsys):
    default_dir, lora_dir = tmp_path / "default", tmp_path / "lora"
    assert train.main(TINY + ["--max-steps", "4", "--out-dir", str(default_dir)]) == 0
    capsys.readouterr()
    assert demo.main([str(default_dir), "--steps", "3", "--rank", "2", "--out-dir", str(lora_dir)]) == 0
    out = capsys.readouterr().out
    summary = read(lora_dir / "lora-demo.json")
    assert set(summary["before"]) == set(summary["after"]) == {*TASKS, demo.NEW_KIND}
    # the old kinds' test prompts are the default run's held-out ones: its own scores, recomputed
    assert {kind: summary["before"][kind] for kind in TASKS} == read(default_dir / "metrics.json")[
        "exact_match_by_task"]
    # with replay, the run's own test set holds every kind: its scores are the "after" column
    assert summary["after"] == read(lora_dir / "metrics.json")["exact_match_by_task"]
    for kind, rate in summary["after"].items():
        line = re.search(rf"^{kind} +(\S+) +(\S+) .*: (met|MISSED)$", out, re.M)
        assert line and line.group(2) == f"{rate:.1%}", kind
    assert re.search(r"^adapters: [\d.]+ MB against [\d.]+ MB for the model", out, re.M)
    assert re.search(r"^time: [\d.]+ min wall, [\d.]+ min CPU \(all threads\) for the LoRA run \(3 steps",
                     out, re.M)
    assert summary["lora"]["rank"] == 2 and summary["steps"] == 3

    command = shlex.split(re.search(r"^equivalent: (.*)$", out, re.M).group(1))
    assert command[:2] == ["python", "train.py"]
    settings = vars(train.build_parser().parse_args(command[2:]))
    assert train.config_from_flags(settings) == RunConfig(**read(lora_dir / "config.json"))


def test_a_folder_that_is_not_a_finished_run_is_one_error_line(tmp_path, capsys):
    assert demo.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a finished run folder" in err and err.count("\n") == 1
