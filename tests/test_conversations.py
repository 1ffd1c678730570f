"""Conversations as training data: what is refused, what the loss learns, what a long one loses, the run."""
import json
import re

import numpy as np
import pytest

import train
from minigpt import data
from minigpt.data import InstructionDataset, check_conversation, collate, load_instruction_data
from minigpt.loader import DataLoader
from minigpt.losses import IGNORE_INDEX
from minigpt.pipeline import steps
from minigpt.pipeline.responses import decode_response, prompt_ids
from minigpt.prompts import reply_prompt
from minigpt.tokenizer import byte_tokenizer
from test_prompts import CONVERSATION, NO_INPUT, WITH_INPUT
from test_train_cli import TINY, read

BYTE = byte_tokenizer()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write(tmp_path, entries):
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps(entries))
    return path


GOOD = {"messages": CONVERSATION}


@pytest.mark.parametrize("messages, style, message", [
    ([user("a"), {"role": "bot", "content": "b"}], "chat",
     "conversation 1, turn 1: unknown role 'bot'; choose one of: system, user, assistant"),
    ([user("a"), assistant("  ")], "chat", "conversation 1, turn 1: the assistant message's content is"),
    ([user("a")], "chat", "conversation 1: the last message must be the assistant's reply to learn, not a"),
    ([user("a"), assistant("b<|end|>c")], "chat",
     "conversation 1, turn 1: the assistant message holds the literal text '<|end|>', the chat template's"),
    ([user("a <|endoftext|>"), assistant("b")], "phi3",
     "conversation 1, turn 0: the user message holds the literal text '<|endoftext|>'"),
    ([user("a"), user("b"), assistant("c")], "chat", "conversation 1, turn 1: a second user message in a"),
    ([assistant("a"), user("b"), assistant("c")], "chat", "conversation 1, turn 0: a second assistant"),
    ([user("a"), {"role": "system", "content": "s"}, assistant("c")], "chat",
     "conversation 1, turn 1: a system message may only come first"),
    ([user("a"), {"role": "assistant", "content": 3}], "chat", "conversation 1, turn 1: 'content' must be a"),
    ([user("a"), assistant("b"), user("c"), assistant("d")], "phi3",
     "conversation 1: the phi3 template holds one exchange (a user message and its reply) and this "
     "conversation has 2 user messages; train and talk with --prompt-style chat"),
    (CONVERSATION, "alpaca", "conversation 1: the alpaca template holds one exchange (a user message and its "
                             "reply) and this conversation has a system message"),
    ("hello", "chat", 'conversation 1: "messages" must be a non-empty list'),
])
def test_a_bad_conversation_is_refused_with_its_index_and_turn(tmp_path, messages, style, message):
    path = write(tmp_path, [WITH_INPUT, {"messages": messages}])
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")) as info:
        load_instruction_data(path, style)
    assert "\n" not in str(info.value)


def test_a_file_mixes_alpaca_entries_and_conversations_and_the_end_marker_is_the_template_s(tmp_path):
    entries = [WITH_INPUT, {"messages": CONVERSATION[1:3]}, dict(NO_INPUT, output="<|end|>: text to alpaca")]
    path = write(tmp_path, entries)
    assert load_instruction_data(path) == load_instruction_data(path, "alpaca") == entries
    with pytest.raises(ValueError, match=re.escape("entry 2: 'output' holds the literal text '<|end|>'")):
        load_instruction_data(path, "chat")
    check_conversation(CONVERSATION[:-1], "chat", ends_with="user")        # awaiting its reply: a prompt


def learned_texts(dataset, row, targets):
    """The text of each run of kept targets of a row."""
    return [BYTE.decode(run) for run in data.kept_runs(targets[row])]


def test_the_loss_learns_each_reply_and_its_end_marker_and_nothing_else():
    dataset = InstructionDataset([GOOD, WITH_INPUT], BYTE, "chat", mask_prompt=True)
    inputs, targets = dataset.batch([0, 1])
    assert learned_texts(dataset, 0, targets) == ["fbxq<|end|>", "FBXQ<|end|>"]
    assert learned_texts(dataset, 1, targets) == [WITH_INPUT["output"] + "<|end|>"]  # not <|endoftext|>
    # token by token: a target is kept exactly where the next token belongs to a reply or its end marker
    text = "".join(segment.text for segment in data.render(CONVERSATION, "chat"))
    assert dataset[0] == list(text.encode())
    reply_bytes = set()
    for reply in ("fbxq<|end|>", "FBXQ<|end|>"):
        start = text.index(reply)
        reply_bytes |= set(range(start, start + len(reply)))
    kept = [t for t in range(targets.shape[1]) if targets[0, t] != IGNORE_INDEX]
    assert kept == [t - 1 for t in sorted(reply_bytes)]
    unmasked = InstructionDataset([GOOD], BYTE, "chat", mask_prompt=False)   # --no-mask-prompt: every token
    assert learned_texts(unmasked, 0, unmasked.batch([0]).targets) == [text[1:] + "<|endoftext|>"]


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_alpaca_entries_give_the_batches_of_prompt_masking(style):
    """One path for both: an Alpaca entry is a conversation, and its masks are the prompt masking's."""
    entries = [WITH_INPUT, NO_INPUT, dict(NO_INPUT, output="")]
    dataset = InstructionDataset(entries, BYTE, style, mask_prompt=True, allowed_max_length=150)
    inputs, targets = next(iter(DataLoader(dataset, batch_size=3)))
    expected = collate(dataset.token_ids, BYTE.eot_token, allowed_max_length=150,
                       prompt_lengths=dataset.prompt_lengths)
    np.testing.assert_array_equal(inputs, expected[0])
    np.testing.assert_array_equal(targets, expected[1])


def test_a_long_conversation_loses_whole_oldest_exchanges_and_the_run_says_how_many():
    system = {"role": "system", "content": "Be brief."}
    long = [system] + [m for k in range(5) for m in (user(f"question {k}"), assistant(f"answer {k}"))]
    whole = InstructionDataset([{"messages": long}], BYTE, "chat", mask_prompt=True)
    cut = len(whole[0]) - 1                                               # one token too long
    dataset = InstructionDataset([{"messages": long}, GOOD], BYTE, "chat", mask_prompt=True,
                                 allowed_max_length=cut)
    assert dataset.dropped_turns == [1, 0]
    kept = [system] + long[3:]                                            # the system message stays
    assert BYTE.decode(dataset[0]) == "".join(segment.text for segment in data.render(kept, "chat"))
    assert learned_texts(dataset, 0, dataset.batch([0]).targets)[0] == "answer 1<|end|>"
    logged = []
    data.check_responses_fit(dataset, "training", log=logged.append)
    assert logged == [f"1 of 2 training conversations are longer than the cut at {cut} tokens: their 1 "
                      f"oldest exchanges are left out, each whole"]
    tiny = InstructionDataset([{"messages": long}], BYTE, "chat", True, allowed_max_length=20)
    assert tiny.dropped_turns == [4]                                       # the last exchange always stays


def test_a_test_conversation_is_answered_after_its_history_and_the_reply_ends_at_the_end_marker():
    assert BYTE.decode(prompt_ids(BYTE, GOOD, "chat")) == reply_prompt(CONVERSATION[:-1], "chat")
    assert BYTE.decode(prompt_ids(BYTE, WITH_INPUT, "phi3")) == reply_prompt([data.conversation_of(
        WITH_INPUT)[0]], "phi3")
    new = list(b" FBXQ<|end|>\n<|user|>\n") + [BYTE.eot_token] + list(b"more")
    assert decode_response(BYTE, new, "chat") == "FBXQ"
    assert decode_response(BYTE, new, "phi3") == "FBXQ<|end|>\n<|user|>"   # only <|endoftext|> ends it


def test_show_batch_shows_a_conversation_with_its_masks(tmp_path, capsys):
    path = write(tmp_path, [GOOD] * 20)
    assert train.main(["--data", str(path), "--prompt-style", "chat", "--context-length", "192",
                       "--batch-size", "2", "--show-batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "  learned: 'fbxq<|end|>' 'FBXQ<|end|>'" in out.splitlines()


def test_a_run_on_the_chat_tasks_scores_the_last_replies(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = TINY + ["--data", "tasks:reverse,chat", "--prompt-style", "chat", "--context-length", "176",
                   "--max-steps", "2", "--out-dir", str(run_dir)]
    assert train.main(args) == 0
    answered = read(run_dir / "test-responses.json")
    conversations = [entry for entry in answered if "messages" in entry]
    assert conversations and all("model_response" in entry for entry in conversations)
    assert set(read(run_dir / "metrics.json")["exact_match_by_task"]) == {"chat", "reverse"}
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"chat with the model: python generate.py {run_dir} --chat"
    assert train.main(TINY + ["--data", "tasks:chat", "--max-steps", "1"]) == 2  # phi3: one exchange
    assert "the task kind chat is conversations of several exchanges, and the phi3 template holds one: " \
           "use --prompt-style chat" in capsys.readouterr().err


def test_a_conversation_is_scored_against_its_last_reply_and_the_judge_is_not_asked():
    logged = []
    answered = [dict(GOOD, task="chat", model_response=" FBXQ"), dict(WITH_INPUT, model_response="no")]
    metrics = steps.score(answered, judge_model="llama3", log=logged.append)
    assert metrics["exact_match"] == 0.5 and metrics["judge"] is None
    assert "skipping the LLM judge: its prompt (rasbt's) scores a response to one instruction" in logged[-1]


def test_train_py_refuses_a_bad_conversation_with_one_line(tmp_path, capsys):
    path = write(tmp_path, [GOOD, {"messages": [user("a"), assistant("b"), user("c"), assistant("d")]}])
    assert train.main(["--data", str(path), "--show-batch"]) == 2                # phi3: one exchange
    err = capsys.readouterr().err
    assert err == (f"error: {path}: conversation 0: the phi3 template holds one exchange (a user message and "
                   f"its reply) and this conversation has a system message; train and talk with "
                   f"--prompt-style chat\n")
