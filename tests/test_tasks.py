"""The built-in task dataset: deterministic, held out, and every answer right; selections of kinds."""
import hashlib
import json

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
    if task == "swapcase":
        return bytes(b ^ 0x20 for b in x.encode("ascii")).decode("ascii")  # ASCII: case is bit 5
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
    # add has 90 * 9 = 810 distinct prompts: 4,500 held-out test prompts, 900 of them additions, cannot exist
    with pytest.raises(ValueError, match="ran out of prompts"):
        tasks.make_task_splits(seed=0, n_train=10, n_val=0, n_test=4500, tasks=("add",))
    with pytest.raises(ValueError, match="unknown task kinds"):
        tasks.make_task_splits(tasks=("divide",))


def test_the_default_dataset_is_unchanged_by_the_kinds_outside_the_mix():
    """SHA-256 of the default run's test and validation sets and its first 1,000 training entries (the
    train split is drawn one entry at a time, after them), as generated at commit c480504, before
    `swapcase` existed: adding a kind must not change what `python train.py` trains and tests on."""
    splits = tasks.make_task_splits(seed=0, n_train=1000, n_val=250, n_test=500)
    assert hashlib.sha256(json.dumps(splits).encode()).hexdigest() == \
        "48800d8a2d26fd075ad6084aa3a990c79e3911613eebe9d7dc4007c9544dc2ff"
    assert tasks.TASKS == ("reverse", "sort", "uppercase", "count", "add")
    assert "swapcase" in tasks.KINDS and "swapcase" not in tasks.TASKS


def test_a_selection_is_tested_on_the_default_held_out_prompts_plus_the_new_kind(splits):
    kinds = ("swapcase", "add", "reverse")
    train, val, test = tasks.make_task_splits(seed=0, tasks=kinds, **SIZES)
    for default_split, split, n in ((splits[1], val, SIZES["n_val"]), (splits[2], test, SIZES["n_test"])):
        old = [e for e in default_split if e["task"] in kinds]
        assert split[:len(old)] == old                                # the default run's held-out prompts
        new = split[len(old):]
        assert len(new) == n // len(tasks.TASKS) and {e["task"] for e in new} == {"swapcase"}
    assert {e["task"] for e in train} == set(kinds) and len(train) == SIZES["n_train"]
    held_out = {prompt(e) for split in splits[1:] for e in split} | {prompt(e) for e in val + test}
    assert not {prompt(e) for e in train} & held_out                  # not even the default's other kinds
    for e in train + val + test:
        assert e["output"] == solve(e), e
    swapped = [e for e in test if e["task"] == "swapcase"]
    assert any(e["input"].islower() for e in swapped) is not all(e["input"].islower() for e in swapped)
    assert all(e["input"] != e["output"] for e in swapped)


def test_data_names_select_kinds():
    assert tasks.selected_kinds("tasks") == tasks.TASKS
    assert tasks.selected_kinds("tasks:swapcase, add") == ("swapcase", "add")
    assert tasks.selected_kinds("my-data.json") is None
    with pytest.raises(ValueError, match="unknown task kind 'divide' in --data tasks:add,divide; choose"):
        tasks.selected_kinds("tasks:add,divide")
    with pytest.raises(ValueError, match="names the task kind add twice"):
        tasks.selected_kinds("tasks:add,add*2")
    assert tasks.selected_kinds("tasks:swapcase*3,add") == ("swapcase",) * 3 + ("add",)
    for weight in ("0", "-1", "1.5", "x"):
        with pytest.raises(ValueError, match=f"the weight of add must be a positive integer, got '{weight}'"):
            tasks.selected_kinds(f"tasks:swapcase,add*{weight}")


def test_a_weighted_kind_is_drawn_that_many_times_as_often_but_tested_as_the_others(splits):
    train, val, test = tasks.make_task_splits(seed=0, tasks=("swapcase",) * 3 + ("add",), **SIZES)
    assert sum(e["task"] == "swapcase" for e in train) == 3 * sum(e["task"] == "add" for e in train)
    assert (sum(e["task"] == "swapcase" for e in test), sum(e["task"] == "add" for e in test)) == (40, 40)
    assert test == tasks.make_task_splits(seed=0, tasks=("swapcase", "add"), **SIZES)[2]


# ---------------------------------------------------------------------------------------------
# Conversations: the chat kind

def replay(messages):
    """Recompute each reply of a chat conversation from its requests, without the generator's code."""
    word_task = {"Reverse": "reverse", "Sort": "sort", "Uppercase": "uppercase"}
    instruction, word = messages[0]["content"].split("\n")
    answer = solve({"task": word_task[instruction], "input": word})
    answers = [answer]
    for request in messages[2::2]:
        answer = {"Reverse it": answer[::-1], "Uppercase it": answer.upper(),
                  "How many letters?": str(len(answer))}[request["content"]]
        answers.append(answer)
    return answers


def test_chat_conversations_are_right_and_each_request_needs_the_answer_before():
    train, val, test = tasks.make_task_splits(seed=0, n_train=600, n_val=50, n_test=100,
                                              tasks=("reverse", "chat"))
    conversations = [e for e in train + val + test if e["task"] == "chat"]
    assert len(conversations) == 300 + 10 + 20 and {len(e["messages"]) for e in conversations} == {4, 6}
    for e in conversations:
        messages = e["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert [m["content"] for m in messages[1::2]] == replay(messages), e
        assert e["follow_up"] == messages[-2]["content"]
        replies = [m["content"] for m in messages[1::2]]
        assert all(a != b for a, b in zip(replies, replies[1:]))            # every request changes the answer
        assert "How many letters?" not in [m["content"] for m in messages[2:-2:2]]   # a count comes last
    assert {e["follow_up"] for e in conversations} == set(tasks.FOLLOW_UPS)


def test_chat_test_conversations_and_single_prompts_are_held_out_of_training():
    train, val, test = tasks.make_task_splits(seed=0, n_train=3000, n_val=50, n_test=250,
                                              tasks=("reverse", "sort", "chat"))
    held_out = {key for e in val + test for key in tasks.prompt_keys(e)[:1]}
    opened = set()
    for e in train:
        keys = tasks.prompt_keys(e)
        assert keys[0] not in held_out, e                                  # no held-out question
        if "messages" in e:
            opened.add(keys[1])
    singles = {prompt(e) for e in val + test if "messages" not in e}
    assert opened and not opened & singles                                 # no conversation opens with one
