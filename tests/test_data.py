"""Instruction data: validation errors, splits, the dataset, collate rules."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from minigpt import data
from minigpt.data import InstructionDataset, collate, load_instruction_data, split_data
from minigpt.loader import DataLoader
from minigpt.prompts import build_prompt, format_example, format_input, response_header
from minigpt.losses import IGNORE_INDEX
from minigpt.tokenizer import byte_tokenizer, encode, gpt2_tokenizer
from test_prompts import NO_INPUT, WITH_INPUT

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
I, E = IGNORE_INDEX, 50256  # short names for the target matrices below


def write(tmp_path, content, name="data.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
    return path


def synthetic_entries(n):
    return [{"instruction": f"task {i}", "input": "x" * (i % 3), "output": "y" * (i % 7)} for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Loading

def test_load_valid_file_keeps_extra_keys(tmp_path):
    entries = [WITH_INPUT, dict(NO_INPUT, model_response="45,000 meters.")]
    assert load_instruction_data(write(tmp_path, entries)) == entries


@pytest.mark.parametrize("content, message", [
    ('[\n  {"instruction": "a",\n  "input": ""\n', r"invalid JSON at line 4, column 1"),
    ({"instruction": "a"}, r"expected a JSON list of entries, got dict"),
    ([], r"the list of entries is empty"),
    ([WITH_INPUT, "just text"], r"entry 1 is not an object but str"),
    ([WITH_INPUT, NO_INPUT, {"instruction": "a", "input": ""}], r"entry 2 is missing the key 'output'"),
    ([{"instruction": "a", "input": None, "output": "b"}],
     r"entry 0: 'input' must be a string, got NoneType"),
    ([{"instruction": ["a"], "input": "", "output": "b"}],
     r"entry 0: 'instruction' must be a string, got list"),
])
def test_load_errors_name_the_entry_and_problem(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(ValueError, match=message) as info:
        load_instruction_data(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_json_lines_says_a_list_is_expected(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in [WITH_INPUT, NO_INPUT]))
    with pytest.raises(ValueError) as info:
        load_instruction_data(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid JSON at line 2, column 1: Extra data")
    assert "one JSON list of entries" in message and "JSON Lines" in message and "\n" not in message


def test_load_json_nested_too_deeply_is_one_line(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: invalid JSON: nested too deeply"):
        load_instruction_data(path)


def test_load_not_utf8(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"instruction": "café"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text"):
        load_instruction_data(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="instruction data file not found: .*nope.json"):
        load_instruction_data(tmp_path / "nope.json")


def test_download_returns_the_cached_file(tmp_path, monkeypatch):
    cached = write(tmp_path, [WITH_INPUT], name="instruction-data.json")
    monkeypatch.setattr(data, "download_file", lambda *a, **k: pytest.fail("must not download"))
    assert data.download_instruction_data(tmp_path) == cached


def test_download_when_absent_tells_how_to_use_a_local_file(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(data, "download_file", lambda url, path, hint: calls.append((url, path, hint)))
    path = data.download_instruction_data(tmp_path / "data")
    assert calls == [(data.REFERENCE_DATA_URL, tmp_path / "data" / "instruction-data.json", calls[0][2])]
    assert path == calls[0][1] and "--data PATH" in calls[0][2]


# ---------------------------------------------------------------------------------------------
# Splits and the dataset

@pytest.mark.skipif(not (SHARED_DATA / "instruction-data.json").is_file(), reason="shared dataset absent")
def test_split_sizes_on_the_reference_dataset():
    train, val, test = split_data(load_instruction_data(SHARED_DATA / "instruction-data.json"))
    assert (len(train), len(val), len(test)) == (935, 55, 110)


def test_split_sizes_and_order(tmp_path):
    entries = load_instruction_data(write(tmp_path, synthetic_entries(1100)))
    train, val, test = split_data(entries)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train + test + val == entries  # consecutive slices; test comes before val, as in the reference
    assert [len(part) for part in split_data(entries[:20])] == [17, 1, 2]  # int(17.0), rest, int(2.0)


def test_split_shuffle_is_seeded_and_leaves_input_alone():
    entries = synthetic_entries(50)
    original = list(entries)
    first, second = split_data(entries, shuffle_seed=1), split_data(entries, shuffle_seed=1)
    assert first == second and entries == original
    assert first[0] != entries[:42]
    names = sorted(e["instruction"] for part in first for e in part)
    assert names == sorted(e["instruction"] for e in entries)
    with pytest.raises(ValueError, match="split fractions"):
        split_data(entries, train_frac=0.95, test_frac=0.1)


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_dataset_tokenizes_once_and_counts_the_prompt(style):
    dataset = InstructionDataset([WITH_INPUT, NO_INPUT], byte_tokenizer(), style=style)
    assert len(dataset) == 2 and dataset.entries[1] is NO_INPUT
    for i, entry in enumerate([WITH_INPUT, NO_INPUT]):
        assert dataset[i] == list(format_example(entry, style).encode())  # byte tokens == UTF-8 bytes
        prompt = format_input(entry, style) + response_header(style)
        assert dataset.prompt_lengths[i] == len(prompt.encode())


@pytest.mark.skipif(not (SHARED_DATA / "gpt2" / "vocab.bpe").is_file(), reason="GPT-2 vocab absent")
@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_dataset_with_gpt2_tokens(style):
    gpt2 = gpt2_tokenizer(SHARED_DATA / "gpt2")
    dataset = InstructionDataset([WITH_INPUT], gpt2, style=style)
    prompt_ids = encode(gpt2, format_input(WITH_INPUT, style) + response_header(style))
    assert dataset.prompt_lengths[0] == len(prompt_ids)
    assert dataset[0] == prompt_ids + encode(gpt2, WITH_INPUT["output"])
    assert dataset[0] == encode(gpt2, format_example(WITH_INPUT, style))  # no merge across the boundary here


# ---------------------------------------------------------------------------------------------
# Collate: one test per rule

REFERENCE_BATCH = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]  # rasbt ch. 7's example


def test_collate_reference_example():
    inputs, targets = collate(REFERENCE_BATCH)
    assert inputs.dtype == targets.dtype == np.int64
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, E, E, E], [7, 8, 9, E, E]]
    # the longest row gets one <|endoftext|>, which stays a target; later pads are ignored
    assert targets.tolist() == [[1, 2, 3, 4, E], [6, E, I, I, I], [8, 9, E, I, I]]


def test_collate_pad_and_ignore_values_are_parameters():
    inputs, targets = collate([[1, 2], [3]], pad_token_id=0, ignore_index=-1)
    assert inputs.tolist() == [[1, 2], [3, 0]]
    assert targets.tolist() == [[2, 0], [0, -1]]


def test_collate_masks_pads_by_position_not_value():
    # a real <|endoftext|> inside the text (id 50256) is a target like any other token
    _, targets = collate([[1, E, 2], [3]])
    assert targets.tolist() == [[E, 2, E], [E, I, I]]


def test_collate_masks_the_prompt():
    # targets[i, :p-1] = I: target t is token t+1, so the first p-1 targets are prompt tokens 1..p-1
    _, targets = collate(REFERENCE_BATCH, prompt_lengths=[3, 1, 2])
    assert targets.tolist() == [[I, I, 3, 4, E], [6, E, I, I, I], [I, 9, E, I, I]]
    _, targets = collate(REFERENCE_BATCH, ignore_index=-7, prompt_lengths=[3, 1, 2])
    assert targets.tolist() == [[-7, -7, 3, 4, E], [6, E, -7, -7, -7], [-7, 9, E, -7, -7]]


def test_collate_truncates_after_masking():
    inputs, targets = collate(REFERENCE_BATCH, allowed_max_length=3, prompt_lengths=[3, 1, 2])
    assert inputs.tolist() == [[0, 1, 2], [5, 6, E], [7, 8, 9]]
    assert targets.tolist() == [[I, I, 3], [6, E, I], [I, 9, E]]


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_prompt_masking_leaves_exactly_the_response(style):
    byte = byte_tokenizer()
    dataset = InstructionDataset([WITH_INPUT, NO_INPUT], byte, style=style, mask_prompt=True)
    inputs, targets = next(iter(DataLoader(dataset, batch_size=2)))
    for row, entry in enumerate([WITH_INPUT, NO_INPUT]):
        assert inputs[row, :len(dataset[row])].tolist() == dataset[row]
        # what is left to learn: the output, then one <|endoftext|>
        assert targets[row][targets[row] != I].tolist() == list(entry["output"].encode()) + [byte.eot_token]


def test_collate_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one sequence"):
        collate([])
    with pytest.raises(ValueError, match=r"prompt_lengths has shape \(2,\), expected \(3,\)"):
        collate(REFERENCE_BATCH, prompt_lengths=[1, 2])


# ---------------------------------------------------------------------------------------------
# Text that would change training silently

@pytest.mark.parametrize("key", data.INSTRUCTION_KEYS)
def test_a_literal_end_of_text_in_an_entry_is_refused_with_its_index(tmp_path, key):
    entries = synthetic_entries(4)
    entries[2][key] = "before <|endoftext|> after"
    message = f"entry 2: {key!r} holds the literal text '<|endoftext|>'"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_instruction_data(write(tmp_path, entries))
    with pytest.raises(ValueError, match=re.escape("holds the literal text '<|endoftext|>'")):
        InstructionDataset(entries, byte_tokenizer())  # made from Python, not a file: the tokenizer refuses


def test_examples_that_lose_their_whole_response_are_counted_and_most_is_an_error():
    tokenizer = byte_tokenizer()
    short = {"instruction": "i", "input": "", "output": "abc"}
    prompt_length = len(build_prompt(short, "alpaca"))
    long = dict(short, instruction="i" * 50)
    logged = []

    def dataset(entries, cut, mask_prompt=True):
        return InstructionDataset(entries, tokenizer, "alpaca", mask_prompt=mask_prompt,
                                  allowed_max_length=cut)

    data.check_responses_fit(dataset([short, short, long], prompt_length), "training", log=logged.append)
    assert logged == [f"warning: 1 of 3 training examples lose their whole response to the cut at "
                      f"{prompt_length} tokens (their prompt alone is longer), so they teach nothing"]
    for mask_prompt in (True, False):     # the response would be the first target after the prompt
        with pytest.raises(ValueError, match=rf"2 of 3 validation examples lose their whole response to the "
                                             rf"cut at {prompt_length} tokens.*more than half"):
            data.check_responses_fit(dataset([short, long, long], prompt_length, mask_prompt), "validation")
    logged.clear()
    data.check_responses_fit(dataset([short, long], None), "training", log=logged.append)  # no cut
    assert logged == []
