"""Preference data: validation, download, split, tokenization and the pair collate."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from minigpt import preference
from minigpt.data import InstructionDataset, split_data, validate_entries
from minigpt.losses import IGNORE_INDEX
from minigpt.preference import PreferenceDataset, collate_preferences, load_preference_data
from minigpt.tokenizer import EOT, byte_tokenizer, gpt2_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PREFERENCE_FILE = SHARED_DATA / "instruction-data-with-preference.json"
I = IGNORE_INDEX
PAIR = {"instruction": "Edit the following sentence for grammar.", "input": "He go to the park every day.",
        "output": "He goes to the park every day.", "chosen": "He goes to the park every day.",
        "rejected": "He goes to the stupid park every single day."}


def write(tmp_path, entries):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(entries))
    return path


def synthetic_pairs(n):
    return [{"instruction": f"task {i}", "input": "x" * (i % 2), "output": "y" * (i % 3 + 1),
             "chosen": "y" * (i % 3 + 1), "rejected": "z" * (i % 4)} for i in range(n)]


@pytest.mark.parametrize("entry, message", [
    ({k: v for k, v in PAIR.items() if k != "rejected"}, r"entry 1 is missing the key 'rejected'"),
    (dict(PAIR, chosen=None), r"entry 1: 'chosen' must be a string, got NoneType"),
    (dict(PAIR, chosen=["a", "b"]), r"entry 1: 'chosen' must be a string, got list"),
    (dict(PAIR, instruction=3), r"entry 1: 'instruction' must be a string, got int"),
])
def test_load_names_the_bad_entry(tmp_path, entry, message):
    path = write(tmp_path, [PAIR, entry, PAIR])
    with pytest.raises(ValueError, match=message) as info:
        load_preference_data(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_keeps_a_valid_file_and_entries_in_memory_are_validated_alike(tmp_path):
    assert load_preference_data(write(tmp_path, [PAIR])) == [PAIR]
    with pytest.raises(FileNotFoundError, match="preference data file not found"):
        load_preference_data(tmp_path / "absent.json")
    with pytest.raises(ValueError, match="preference data: entry 0 is missing the key 'chosen'"):
        validate_entries([{"instruction": "a", "input": "", "output": "b"}], preference.PREFERENCE_KEYS,
                         source="preference data")


def test_download_uses_the_cached_file_and_otherwise_the_public_url(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(preference, "download_file", lambda url, path, hint: calls.append((url, path, hint)))
    path = preference.download_preference_data(tmp_path)
    assert calls == [(preference.PREFERENCE_DATA_URL, tmp_path / "instruction-data-with-preference.json",
                      calls[0][2])]
    assert path == calls[0][1] and "--data PATH" in calls[0][2]
    assert preference.PREFERENCE_DATA_URL.endswith("ch07/04_preference-tuning-with-dpo/"
                                                   "instruction-data-with-preference.json")
    path.write_text(json.dumps([PAIR]))
    assert preference.download_preference_data(tmp_path) == path and len(calls) == 1


def test_split_is_85_5_10_in_train_val_test_order():
    entries = synthetic_pairs(1100)
    train, val, test = split_data(entries)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train == entries[:935] and test == entries[935:1045] and val == entries[1045:]  # as the reference
    shuffled = split_data(entries, shuffle_seed=3)
    assert shuffled == split_data(entries, shuffle_seed=3) and shuffled[0] != train


def test_collate_keeps_exactly_the_responses_and_their_end_of_text():
    """Pair 0: prompt 1 2 3, chosen 7 8, rejected 9.  Pair 1: prompt 4 5, chosen 6, rejected 10 11 12."""
    E = 99
    inputs, targets = collate_preferences(chosen=[[1, 2, 3, 7, 8], [4, 5, 6]],
                                          rejected=[[1, 2, 3, 9], [4, 5, 10, 11, 12]],
                                          prompt_lengths=[3, 2], pad_token_id=E)
    np.testing.assert_array_equal(inputs, [[1, 2, 3, 7, 8],        # chosen 0
                                           [4, 5, 6, E, E],        # chosen 1
                                           [1, 2, 3, 9, E],        # rejected 0
                                           [4, 5, 10, 11, 12]])    # rejected 1
    np.testing.assert_array_equal(targets, [[I, I, 7, 8, E],
                                            [I, 6, E, I, I],
                                            [I, I, 9, E, I],
                                            [I, 10, 11, 12, E]])
    with pytest.raises(ValueError, match="2 chosen, 1 rejected and 2 prompt lengths"):
        collate_preferences([[1], [2]], [[3]], [1, 1], E)


def test_dataset_prompt_is_the_fine_tuning_prompt_and_batches_score_the_response_only():
    tokenizer = byte_tokenizer()
    entries = [PAIR, dict(PAIR, input="", chosen="Yes.", rejected="")]
    dataset = PreferenceDataset(entries, tokenizer, style="phi3")
    as_instructions = InstructionDataset([dict(e, output=e["chosen"]) for e in entries], tokenizer, "phi3")
    assert dataset.chosen == as_instructions.token_ids
    assert dataset.prompt_lengths == as_instructions.prompt_lengths
    batch = dataset.batch([1, 0])
    assert batch.size == 2 and batch.inputs.shape == batch.targets.shape == (4, batch.inputs.shape[1])
    for row, text in zip(batch.targets, ["Yes.", PAIR["chosen"], "", PAIR["rejected"]]):
        assert tokenizer.decode(row[row != I].tolist()) == text + EOT
    assert [b.indices.tolist() for b in dataset.batches(1)] == [[0], [1]]


def test_fingerprint_follows_the_content_and_allowed_length_cuts_or_leaves_out():
    tokenizer = byte_tokenizer()
    base = PreferenceDataset([PAIR], tokenizer)
    assert PreferenceDataset([dict(PAIR)], tokenizer).fingerprint == base.fingerprint
    for other in (PreferenceDataset([dict(PAIR, rejected="No.")], tokenizer),
                  PreferenceDataset([PAIR], tokenizer, style="phi3"),
                  PreferenceDataset([PAIR], tokenizer, allowed_max_length=400)):
        assert other.fingerprint != base.fingerprint
    prompt_length = base.prompt_lengths[0]
    cut = PreferenceDataset([PAIR], tokenizer, allowed_max_length=prompt_length + 2).batch([0])
    assert cut.inputs.shape == (2, prompt_length + 2)
    kept = cut.targets[0][cut.targets[0] != I]
    assert tokenizer.decode(kept.tolist()) == PAIR["chosen"][:3]   # response cut, no fake end of text
    short = dict(PAIR, instruction="Hi")                           # a prompt that still fits
    both = PreferenceDataset([PAIR, short], tokenizer, allowed_max_length=prompt_length - 1)
    assert (both.entries, both.left_out, len(both)) == ([short], 1, 1)   # the long prompt is left out


def test_pairs_that_fill_the_context_follow_fine_tuning_s_rule():
    """Fine-tuning's rule (data.check_responses_fit): some left out is a warning with the count, more
    than half an error, so one long prompt no longer refuses a whole file."""
    tokenizer = byte_tokenizer()
    long, short = PAIR, dict(PAIR, instruction="Hi")
    cut = PreferenceDataset([long], tokenizer).prompt_lengths[0] - 1
    logged = []
    preference.check_pairs_fit(PreferenceDataset([long, short, short], tokenizer, allowed_max_length=cut),
                               "training", log=logged.append)
    assert logged == [f"warning: 1 of 3 training pairs lose their whole responses to the cut at {cut} tokens "
                      f"(their prompt alone is longer), so they are left out"]
    with pytest.raises(ValueError, match="2 of 3 validation pairs lose .* more than half"):
        preference.check_pairs_fit(PreferenceDataset([long, long, short], tokenizer, allowed_max_length=cut),
                                   "validation")
    logged.clear()
    preference.check_pairs_fit(PreferenceDataset([long], tokenizer), "test", log=logged.append)  # no cut
    assert logged == []


def test_pairs_with_the_same_responses_are_counted_and_all_of_them_refused():
    same = dict(PAIR, rejected=PAIR["chosen"])
    logged = []
    preference.check_pairs_differ([PAIR, same, PAIR], "training", log=logged.append)
    assert logged == ["warning: 1 of 3 training pairs have the same chosen and rejected response; they teach "
                      "nothing (their loss stays at log 2)"]
    with pytest.raises(ValueError, match="every one of the 2 training pairs has the same chosen and"):
        preference.check_pairs_differ([same, same], "training")


@pytest.mark.skipif(not PREFERENCE_FILE.is_file(), reason="shared preference data absent")
def test_the_reference_file_loads_splits_and_masks_with_gpt2_tokens():
    entries = load_preference_data(PREFERENCE_FILE)
    assert len(entries) == 1100
    assert [len(part) for part in split_data(entries)] == [935, 55, 110]
    tokenizer = gpt2_tokenizer(SHARED_DATA / "gpt2")
    batch = PreferenceDataset(entries[:2], tokenizer).batch([0, 1])
    rejected_1 = batch.targets[batch.size + 1]
    assert tokenizer.decode(rejected_1[rejected_1 != I].tolist()) == entries[1]["rejected"] + EOT
    assert entries[1]["rejected"] == "He goes to the stupid park every single day."


def test_a_literal_end_of_text_in_a_response_is_refused_with_its_index(tmp_path):
    entry = dict(PAIR, rejected=f"no{EOT}")
    message = "entry 1: 'rejected' holds the literal text '<|endoftext|>'"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_preference_data(write(tmp_path, [PAIR, entry]))
    with pytest.raises(ValueError, match=re.escape("holds the literal text '<|endoftext|>'")):
        PreferenceDataset([entry], byte_tokenizer())  # made from Python, not a file: the tokenizer refuses
