"""report.md: what a run writes at its end (settings, data and the cut, losses, scores per kind, right and
wrong responses, time and machine), and the benchmark results added to it later; `benchmark --before`
scores the run's step-0 weights."""
import argparse
import json

import pytest

import train
from minigpt import tasks
from minigpt.data import InstructionDataset
from minigpt.evaluate import benchmark
from minigpt.evaluate.__main__ import main
from minigpt.loader import DataLoader
from minigpt.pipeline import report
from minigpt.preference import PreferenceDataset
from minigpt.prompts import build_prompt
from minigpt.tokenizer import byte_tokenizer
from minigpt.training import calc_loss_loader
from test_train_cli import TINY

CONTEXT = 40  # short enough that some task examples are cut, and a few count prompts lose their response


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    argv = TINY + ["--context-length", str(CONTEXT), "--max-steps", "3", "--out-dir", str(run_dir)]
    assert train.main(argv) == 0
    return run_dir


def test_a_run_writes_a_report_a_person_reads_first(run_dir):
    text = (run_dir / "report.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings[:6] == ["# run", "## Settings", "## Data", "## Training", "## Test responses",
                            "## Examples"]
    assert "Instruction fine-tuning of a new model (random weights) on tasks: finished " in text
    assert ", took " in text and " cores, " in text and "NumPy" in text
    assert f"| new model | emb 16, 1 layers, 2 heads, context {CONTEXT} |" in text
    assert "| prompts | phi3, prompt masked |" in text
    assert "![loss plot](loss-plot.png)" in text and "3 steps, " in text and "best validation loss " in text
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for kind, rate in metrics["exact_match_by_task"].items():
        assert f"| {kind} | {rate:.1%} |" in text
    responses = json.loads((run_dir / "test-responses.json").read_text())
    wrong = [e for e in responses if e["model_response"].strip() != e["output"]]
    assert f"### Wrong ({len(wrong)} of 5)" in text
    assert f"| {wrong[0]['instruction']} / {wrong[0]['input']} | {wrong[0]['output']} |" in text
    assert text.rstrip().endswith(report.RESULTS_MARK)


def test_the_data_table_counts_what_the_cut_took(run_dir):
    """Counted here from the texts' bytes (the byte tokenizer: one token a byte), against the report's."""
    train_entries, val_entries, _ = tasks.make_task_splits(seed=0, n_train=24, n_val=4, n_test=5)
    text = (run_dir / "report.md").read_text()
    for name, entries in (("training", train_entries), ("validation", val_entries)):
        prompts = [len(build_prompt(e, "phi3").encode()) for e in entries]
        shortened = sum(p + len(e["output"]) > CONTEXT for p, e in zip(prompts, entries))
        lost = sum(p > CONTEXT for p in prompts)
        assert f"| {name} | {len(entries)} | {shortened} ({shortened / len(entries):.1%}) | {lost} |" in text
    assert "| test | 5 | answered in full |  |" in text
    assert f"| shortened by the cut at {CONTEXT} tokens |" in text
    assert "| training | 24 | 0 (0.0%)" not in text                    # the cut did take something


def test_preference_pairs_left_out_are_counted_as_cut():
    entries = [{"instruction": "Say", "input": "x" * n, "output": "y", "chosen": "yes", "rejected": "no"}
               for n in (1, 20, 40)]
    dataset = PreferenceDataset(entries, byte_tokenizer(), "phi3", allowed_max_length=50)
    # prompts of 9 + 3 + 1 + n + 16 bytes: 30 (fits with its responses), 49 (its "yes" is cut), 69 (left out)
    assert report._cut_counts(dataset) == (3, "2 (66.7%)", 1)
    instructions = InstructionDataset(entries, byte_tokenizer(), "phi3", True, allowed_max_length=50)
    assert report._cut_counts(instructions) == (3, "1 (33.3%)", 1)      # 49 + "y" fits; 69 loses it all


def test_benchmark_results_are_added_below_the_runs_part(run_dir, capsys):
    head = (run_dir / "report.md").read_text().split(report.RESULTS_MARK)[0]
    assert main(["benchmark", "tasks", str(run_dir), "--limit", "3"]) == 0
    assert main(["benchmark", "tasks", str(run_dir), "--format", "letter", "--before"]) == 0
    assert main(["benchmark", "tasks", str(run_dir), "--limit", "3"]) == 0        # again: replaced, not added
    text = (run_dir / "report.md").read_text()
    assert text.split(report.RESULTS_MARK)[0] == head
    results = text.split(report.RESULTS_MARK)[1]
    assert results.count("## Benchmarks") == 1 and results.count("tasks, 0-shot, ") == 2
    assert f"tasks, 0-shot, {run_dir} before training (random weights, seed 123)" in results
    record = json.loads((run_dir / "benchmark-tasks-cloze+letter-0shot.json").read_text())
    assert set(record["formats"]) == {"cloze", "letter"} and record["formats"]["cloze"]["questions"] == 3
    cloze = record["formats"]["cloze"]
    assert f"| cloze | all | 3 | {cloze['acc']:.3f} | {cloze['acc_norm_chars']:.3f} |" in results
    printed = capsys.readouterr().out
    assert "tasks, cloze, 0-shot: 3 questions (the first of 5)" in printed        # the run's 5 test entries
    assert "tasks, letter, 0-shot: 5 questions\n" in printed and "chance 0.2500" in printed


def test_before_scores_the_runs_step_0_weights(run_dir):
    """The model `--before` rebuilds has the validation loss the run measured at step 0."""
    args = argparse.Namespace(model=None, source=str(run_dir), before=True, data_dir="data")
    settings = json.loads((run_dir / "config.json").read_text())
    model, _ = benchmark.load_model(args, run_dir, settings)
    _, val_entries, _ = tasks.make_task_splits(seed=0, n_train=24, n_val=4, n_test=5)
    val_set = InstructionDataset(val_entries, byte_tokenizer(), "phi3", True, allowed_max_length=CONTEXT)
    history = json.loads((run_dir / "history.json").read_text())
    assert history["steps"][0] == 0
    step_0_loss = calc_loss_loader(model, DataLoader(val_set, 4), 1)
    assert step_0_loss == pytest.approx(history["val_loss"][0], rel=1e-6)


def test_a_folder_without_a_report_gets_one_from_its_files(run_dir, tmp_path):
    folder = tmp_path / "old-run"
    folder.mkdir()
    for name in ("config.json", "metrics.json", "history.json", "test-responses.json"):
        (folder / name).write_bytes((run_dir / name).read_bytes())
    report.add_results(folder)
    text = (folder / "report.md").read_text()
    assert "this page was made afterwards from the folder's files" in text and "## Data" in text
    assert "## Training" in text and "![loss plot]" not in text      # no plot in this folder
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
