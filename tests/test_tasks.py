"""The built-in task dataset: deterministic, held out, and every answer right."""
import pytest

from minigpt import tasks

SIZES = dict(n_train=2000, n_val=100, n_test=200)


@pytest.fixture(scope="module")
def splits():
    return tasks.make_task_splits(seed=0, **SIZES)


def solve(e):
    """Recompute the answer from the input alone, without the generator's code."""
    task, x = e["task"], e["input"]
    if task == "reverse":
        return "".join(x[i] for i in range(len(x) - 1, -1, -1))
    if task == "sort":
        return "".join(chr(c) for c in sorted(map(ord, x)))
    if task == "uppercase":
        return bytes(b - 32 for b in x.encode("ascii")).decode("ascii")
    if task == "count":
        return str(len([w for w in x.split(" ") if w]))
    if task == "add":
        a, b = x.split("+")
        return str(int(a) + int(b))
    raise AssertionError(f"no independent solver for task {task!r}")


def prompt(e):
    return (e["instruction"], e["input"])


def test_sizes_and_layout(splits):
    for split, n in zip(splits, (SIZES["n_train"], SIZES["n_val"], SIZES["n_test"])):
        assert len(split) == n
        for e in split:
            assert set(e) == {"instruction", "input", "output", "task"}
            assert all(isinstance(v, str) for v in e.values())
            assert e["instruction"] and e["output"]


def test_same_seed_same_data_other_seed_other_data(splits):
    assert tasks.make_task_splits(seed=0, **SIZES) == splits
    assert tasks.make_task_splits(seed=1, **SIZES)[2] != splits[2]


def test_validation_and_test_prompts_never_appear_in_train(splits):
    train, val, test = splits
    train_prompts = {prompt(e) for e in train}
    assert not train_prompts & {prompt(e) for e in val}
    assert not train_prompts & {prompt(e) for e in test}
    assert not {prompt(e) for e in val} & {prompt(e) for e in test}
    for split in (val, test):  # every held-out prompt is distinct (train may repeat: add has 810)
        assert len({prompt(e) for e in split}) == len(split)


def test_every_answer_is_right(splits):
    for split in splits:
        for e in split:
            assert e["output"] == solve(e), e


def test_task_kinds_are_balanced_and_varied(splits):
    train, val, test = splits
    assert len(tasks.TASKS) >= 4
    for split in splits:
        counts = {t: sum(e["task"] == t for e in split) for t in tasks.TASKS}
        assert max(counts.values()) - min(counts.values()) <= 1, counts
    for t in tasks.TASKS:  # never a plain copy of the input
        assert any(e["output"] != e["input"] for e in train if e["task"] == t)
        assert all(e["output"] != e["input"] for e in test if e["task"] == t), t


def test_one_instruction_per_task(splits):
    for e in splits[0]:
        assert e["instruction"] == tasks.INSTRUCTIONS[e["task"]]


def test_exact_match_by_task():
    entries = [{"task": "a", "output": "x"}, {"task": "a", "output": "y"}, {"task": "b", "output": "12"}]
    overall, per = tasks.exact_match_by_task(entries, ["x", "z", " 12\n"])
    assert overall == pytest.approx(2 / 3)
    assert per == {"a": 0.5, "b": 1.0}
    with pytest.raises(ValueError):
        tasks.exact_match_by_task(entries, ["x"])


def test_asking_for_more_prompts_than_exist_fails_clearly():
    # add has 90 * 9 = 810 distinct prompts: 900 held-out test prompts cannot exist
    with pytest.raises(ValueError, match="ran out of prompts"):
        tasks.make_task_splits(seed=0, n_train=10, n_val=0, n_test=900, tasks=("add",))
    with pytest.raises(ValueError, match="unknown task kinds"):
        tasks.make_task_splits(tasks=("divide",))
