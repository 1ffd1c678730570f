"""The benchmarks' data: MMLU's CSV layout and HellaSwag's JSON lines, written here; each format rendered to
the exact documented text; k-shot examples that never include the question itself; the built-in tasks'
near misses; downloads that fail with one line, and MMLU's archive unpacked safely; the command."""
import csv
import io
import json
import tarfile

import numpy as np
import pytest

from minigpt import GPTConfig, GPTModel, tasks
from minigpt.evaluate import hellaswag, mmlu, task_choices
from minigpt.evaluate.__main__ import main
from minigpt.evaluate.hellaswag import hellaswag_questions, preprocess
from minigpt.evaluate.mmlu import mmlu_questions
from minigpt.evaluate.multiple_choice import CONVENTIONS, score_questions, summarize
from minigpt.evaluate.task_choices import near_misses, task_questions
from minigpt.files.weights import load_weights, save_npz
from minigpt.tokenizer import byte_tokenizer

PHYSICS_DEV = [["What is measured in newtons?", "Force", "Mass", "Time", "Speed", "A"],
               ["Which is a vector?", "Mass", "Velocity", "Time", "Energy", "B"],
               ["Light is a", "wave, and a particle", "rock", "sound", "liquid", "A"]]
PHYSICS_TEST = [[" What has no charge? ", "Proton", "Electron", "Neutron", "Ion", "C"],
                ["Which is heavier, 1 kg of iron or 1 kg of feathers?", "Iron", "Feathers", "Neither",
                 "It depends", "C"]]
ALGEBRA_TEST = [["Find x if x + 2 = 5.", "1", "2", "3", "4", "C"]]


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture
def mmlu_dir(tmp_path):
    folder = tmp_path / "mmlu"
    write_csv(folder / "dev" / "high_school_physics_dev.csv", PHYSICS_DEV)
    write_csv(folder / "test" / "high_school_physics_test.csv", PHYSICS_TEST)
    write_csv(folder / "dev" / "abstract_algebra_dev.csv", PHYSICS_DEV[:1])
    write_csv(folder / "test" / "abstract_algebra_test.csv", ALGEBRA_TEST)
    return folder


# ---------------------------------------------------------------------------------------------
# MMLU

def test_mmlu_letter_format_renders_exactly(mmlu_dir):
    questions = mmlu_questions(mmlu_dir, "letter", k=0)
    assert [q.group for q in questions] == ["abstract_algebra", "high_school_physics", "high_school_physics"]
    question = questions[1]
    assert question.context == ("The following are multiple choice questions (with answers) about high "
                                "school physics.\n\nWhat has no charge?\nA. Proton\nB. Electron\nC. Neutron\n"
                                "D. Ion\nAnswer:")
    assert question.choices == ("A", "B", "C", "D") and question.delimiter == " " and question.answer == 2


def test_mmlu_letter_format_with_two_examples_renders_exactly(mmlu_dir):
    question = mmlu_questions(mmlu_dir, "letter", k=2, subjects=["high_school_physics"])[0]
    assert question.context == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is measured in newtons?\nA. Force\nB. Mass\nC. Time\nD. Speed\nAnswer: A\n\n"
        "Which is a vector?\nA. Mass\nB. Velocity\nC. Time\nD. Energy\nAnswer: B\n\n"
        "What has no charge?\nA. Proton\nB. Electron\nC. Neutron\nD. Ion\nAnswer:")


def test_mmlu_cloze_format_renders_exactly(mmlu_dir):
    question = mmlu_questions(mmlu_dir, "cloze", k=1, subjects=["high_school_physics"])[0]
    assert question.context == ("The following are questions (with answers) about high school physics.\n\n"
                                "Question: What is measured in newtons?\nAnswer: Force\n\n"
                                "Question: What has no charge?\nAnswer:")
    assert question.choices == ("Proton", "Electron", "Neutron", "Ion") and question.delimiter == " "


def test_k_shot_never_draws_the_question_itself(mmlu_dir):
    # the dev split holds the first test question too: 1-shot must skip it and take the next example
    write_csv(mmlu_dir / "dev" / "high_school_physics_dev.csv", [PHYSICS_TEST[0]] + PHYSICS_DEV)
    first, second = mmlu_questions(mmlu_dir, "cloze", k=1, subjects=["high_school_physics"])
    assert "What has no charge?\nAnswer: Neutron" not in first.context
    assert "Question: What is measured in newtons?\nAnswer: Force\n\n" in first.context
    assert "Question:  What has no charge?" not in second.context        # its own example is the first one
    assert second.context.count("Question:") == 2 and "What has no charge?\nAnswer: Neutron" in second.context
    with pytest.raises(ValueError, match="abstract_algebra has 0 examples other than the question itself, "
                                         "fewer than the 1 asked for"):
        write_csv(mmlu_dir / "dev" / "abstract_algebra_dev.csv", [ALGEBRA_TEST[0]])
        mmlu_questions(mmlu_dir, "letter", k=1)


@pytest.mark.parametrize("rows, message", [
    ([["q", "a", "b", "c", "d"]], "line 1 is not MMLU's question,A,B,C,D,answer"),
    ([["q", "a", "b", "c", "d", "E"]], "line 1 is not MMLU's question,A,B,C,D,answer"),
    ([], "no questions"),
])
def test_a_bad_mmlu_file_is_one_line_naming_it(mmlu_dir, rows, message):
    write_csv(mmlu_dir / "test" / "abstract_algebra_test.csv", rows)
    with pytest.raises(ValueError, match=message) as info:
        mmlu_questions(mmlu_dir)
    assert "abstract_algebra_test.csv" in str(info.value) and "\n" not in str(info.value)


def test_mmlu_refuses_unknown_subjects_and_too_many_shots(mmlu_dir, tmp_path):
    assert len(mmlu.SUBJECTS) == 57 and len(set(mmlu.SUBJECTS)) == 57
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        mmlu_questions(mmlu_dir, subjects=["astrology"])
    with pytest.raises(FileNotFoundError, match="no file for subject"):
        mmlu_questions(mmlu_dir, subjects=["virology"])
    with pytest.raises(ValueError, match="MMLU takes 0 to 5 examples"):
        mmlu_questions(mmlu_dir, k=6)
    with pytest.raises(FileNotFoundError, match="no test/ folder"):
        mmlu_questions(tmp_path / "nowhere")


def test_the_mmlu_archive_is_unpacked_to_dev_and_test_csv_files_only(tmp_path):
    """The release's data.tar, in a data folder: data/dev and data/test CSV files land in mmlu/dev and
    mmlu/test; other splits, other files and names that climb out of the folder are never written."""
    members = {"data/dev/virology_dev.csv": b"q,a,b,c,d,A\n", "data/test/virology_test.csv": b"q,a,b,c,d,B\n",
               "data/auxiliary_train/x.csv": b"q,a,b,c,d,A\n", "data/README.txt": b"hi",
               "../dev/evil.csv": b"x"}
    with tarfile.open(tmp_path / "mmlu-data.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    folder = mmlu.mmlu_folder(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "mmlu/dev/evil.csv", "mmlu/dev/virology_dev.csv", "mmlu/test/virology_test.csv"]
    assert mmlu_questions(folder, "letter", k=1)[0].answer == 1


def test_downloads_without_network_fail_with_one_line_that_says_what_to_do(tmp_path, monkeypatch):
    closed = "http://127.0.0.1:9/nothing"  # the discard port: nothing listens on loopback
    monkeypatch.setattr(mmlu, "MMLU_URL", closed)
    monkeypatch.setattr(hellaswag, "HELLASWAG_URL", closed)
    with pytest.raises(ConnectionError, match="cannot download .*Pass --data FOLDER with MMLU's dev/ and"):
        mmlu.mmlu_folder(tmp_path)
    with pytest.raises(ConnectionError, match="cannot download .*Pass --data PATH with a local copy"):
        hellaswag.hellaswag_file(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


# ---------------------------------------------------------------------------------------------
# HellaSwag

EXAMPLES = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
     "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 7, "activity_label": "Home and Garden", "ctx_a": "[header] How to paint a wall [title] Clean it.",
     "ctx_b": "", "ctx": "[header] How to paint a wall [title] Clean it.", "label": 0,
     "endings": [" [step] Wash it  with soap. ", "Eat it.", "Paint the dog.", "Sleep."],
     "source_id": "wikihow~12"},
]


@pytest.fixture
def hellaswag_path(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(example) + "\n" for example in EXAMPLES))
    return path


def test_hellaswag_harness_rendering_is_exact(hellaswag_path):
    roof, wall = hellaswag_questions(hellaswag_path, "harness")
    assert roof.context == "Roof shingle removal: A man is sitting on a roof. He"     # ctx_b capitalized
    assert roof.choices[3] == "starts pulling up roofing on a roof." and roof.answer == 3
    assert roof.delimiter == " " and roof.group == "activitynet"
    assert wall.context == "Home and Garden: How to paint a wall. Clean it."          # [title] -> ". "
    # the harness strips before it drops "[step]": the space after the marker stays, as in the harness
    assert wall.choices[0] == " Wash it with soap." and wall.group == "wikihow"
    assert preprocess(" a [x] b  c ") == "a b c"


def test_hellaswag_llmc_rendering_keeps_the_text_as_it_is(hellaswag_path):
    roof, wall = hellaswag_questions(hellaswag_path, "llmc")
    assert roof.context == "A man is sitting on a roof. he" and roof.choices == tuple(EXAMPLES[0]["endings"])
    assert wall.choices[0] == " [step] Wash it  with soap. "


@pytest.mark.parametrize("line, message", [
    ("{", "line 1 is not JSON"),
    (json.dumps(dict(EXAMPLES[0], label=4)), "'label' 4 is not the index of an ending"),
    (json.dumps(dict(EXAMPLES[0], label="3")), "'label' must be a int"),
    (json.dumps({k: v for k, v in EXAMPLES[0].items() if k != "ctx_a"}), "'ctx_a' must be a str"),
])
def test_a_bad_hellaswag_line_is_one_line_naming_it(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        hellaswag_questions(path)
    with pytest.raises(ValueError, match="scored 0-shot"):
        hellaswag_questions(path, k=1)


# ---------------------------------------------------------------------------------------------
# The built-in tasks as multiple choice

def test_near_misses_are_three_different_wrong_answers_near_the_right_one():
    rng = np.random.default_rng(0)
    test = tasks.make_task_splits(seed=0, n_train=0, n_val=10, n_test=100)[2]
    for entry in test:
        wrong = near_misses(entry, rng)
        assert len(set(wrong)) == 3 and entry["output"] not in wrong
        if entry["output"].isdigit():
            assert all(abs(int(w) - int(entry["output"])) <= 3 for w in wrong)
        else:
            assert all(len(w) == len(entry["output"]) for w in wrong)


def test_task_cloze_and_letter_formats_render_exactly():
    entry = {"instruction": "Reverse", "input": "kqzt", "output": "tzqk", "task": "reverse"}
    choices = ["tzkq", "tzqk", "tzqa", "szqk"]
    cloze = task_choices.task_question(entry, choices, 1, "cloze", "phi3")
    assert cloze.context == "<|user|>\nReverse\nkqzt\n<|assistant|>:\n"
    assert cloze.choices == tuple(choices) and cloze.delimiter == "" and cloze.group == "reverse"
    letter = task_choices.task_question(entry, choices, 1, "letter")
    assert letter.context == "Reverse\nkqzt\nA. tzkq\nB. tzqk\nC. tzqa\nD. szqk\nAnswer:"
    assert letter.choices == ("A", "B", "C", "D") and letter.delimiter == " " and letter.answer == 1


def test_task_questions_hold_the_right_answer_where_they_say_and_shots_skip_the_question():
    _, val, test = tasks.make_task_splits(seed=0, n_train=0, n_val=10, n_test=20)
    questions = task_questions(test, "cloze", "phi3", seed=3)
    assert [q.choices[q.answer] for q in questions] == [e["output"] for e in test]
    assert len({q.answer for q in questions}) > 1          # the right answer is not always in one place
    assert task_questions(test, "cloze", "phi3", seed=3) == questions
    own = dict(test[0])
    shots = task_questions(test[:1], "letter", k=2, shot_entries=[own] + val, seed=3)[0]
    assert shots.context.count("Answer:") == 3
    assert shots.context.index(f"{own['instruction']}\n{own['input']}\n") == shots.context.rindex(
        f"{own['instruction']}\n{own['input']}\n")          # the question appears once: as the question


# ---------------------------------------------------------------------------------------------
# The command

@pytest.fixture
def tiny_weights(tmp_path):
    path = tmp_path / "tiny.npz"
    save_npz(GPTModel(GPTConfig(vocab_size=257, context_length=256, emb_dim=16, n_heads=2, n_layers=1)), path)
    return path


def test_the_command_scores_mmlu_and_hellaswag_files_in_every_format(tiny_weights, mmlu_dir, hellaswag_path,
                                                                     tmp_path, capsys):
    out = tmp_path / "mmlu.json"
    assert main(["benchmark", "mmlu", str(tiny_weights), "--data", str(mmlu_dir), "--format", "letter,cloze",
                 "--shots", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    model = load_weights(tiny_weights)
    for form in ("letter", "cloze"):
        questions = mmlu_questions(mmlu_dir, form, k=1)
        expected = summarize(questions, score_questions(model, byte_tokenizer(), questions, progress=False))
        result = record["formats"][form]
        assert [result[c] for c in CONVENTIONS] == [expected[c] for c in CONVENTIONS]
        assert set(result["groups"]) == {"abstract_algebra", "high_school_physics"}
        assert result["questions"] == 3
    printed = capsys.readouterr().out
    assert "mmlu, letter, 1-shot: 3 questions" in printed and "high_school_physics" in printed
    out = tmp_path / "hellaswag.json"
    assert main(["benchmark", "hellaswag", str(tiny_weights), "--data", str(hellaswag_path), "--format",
                 "harness,llmc", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["formats"]) == {"harness", "llmc"} and record["conventions"] == CONVENTIONS
    assert set(record["formats"]["llmc"]["groups"]) == {"activitynet", "wikihow"}


@pytest.mark.parametrize("argv, message", [
    (["benchmark", "mmlu"], "give a run folder or weights file, or --model NAME"),
    (["benchmark", "mmlu", "WEIGHTS", "--format", "essay"], "mmlu has no format essay; choose from letter"),
    (["benchmark", "mmlu", "WEIGHTS", "--before"], "--before needs a run folder"),
    (["benchmark", "mmlu", "WEIGHTS", "--shots", "9"], "--shots must be 0 to 5, got 9"),
    (["benchmark", "mmlu", "WEIGHTS", "--data", "nowhere"], "nowhere: no test/ folder of MMLU CSV files"),
    (["benchmark", "hellaswag", "WEIGHTS", "--data", "DATA", "--shots", "1"], "HellaSwag is scored 0-shot"),
    (["benchmark", "mmlu", "WEIGHTS", "--data-dir", "DIR"], "cannot download http://127.0.0.1:9/nothing"),
    (["benchmark", "hellaswag", "missing.npz"], "missing.npz"),
    (["benchmark", "trivia", "WEIGHTS"], "argument benchmark: invalid choice: 'trivia'"),
])
def test_command_errors_are_one_line(argv, message, tiny_weights, hellaswag_path, tmp_path, monkeypatch,
                                     capsys):
    monkeypatch.setattr(mmlu, "MMLU_URL", "http://127.0.0.1:9/nothing")
    swap = {"WEIGHTS": str(tiny_weights), "DATA": str(hellaswag_path), "DIR": str(tmp_path / "data")}
    assert main([swap.get(arg, arg) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
