"""Model cards: every model file a run writes says its tokenizer and template; old files have none."""
import json

import numpy as np
import pytest

import train
from minigpt import GPTConfig, GPTModel
from minigpt.files.fileio import BadFileError
from minigpt.files.model_card import check_card, make_card, read_card
from minigpt.files.weights import CARD_KEY, load_npz, save_npz
from test_train_cli import TINY

CFG = GPTConfig(vocab_size=257, context_length=32, emb_dim=8, n_heads=2, n_layers=1)


def test_a_card_round_trips_through_an_npz_and_the_weights_still_load(tmp_path):
    model = GPTModel(CFG)
    card = make_card("byte", "chat")
    assert card["template"]["end"] == "<|end|>" and card["template"]["user"] == "<|user|>\n"
    path = save_npz(model, tmp_path / "m.npz", card)
    assert read_card(path) == card
    np.testing.assert_array_equal(load_npz(path).wte.weight.data, model.wte.weight.data)
    assert read_card(save_npz(model, tmp_path / "old.npz")) is None       # a file from before cards


def test_a_card_naming_what_this_minigpt_does_not_know_is_refused(tmp_path):
    for card, message in ((dict(make_card("byte", "phi3"), prompt_style="chatml"),
                           "the prompt_style 'chatml'"),
                          (dict(make_card("byte", "phi3"), tokenizer="llama"), "the tokenizer 'llama'"),
                          ({"format": "other"}, "its model card is not minigpt-card-1")):
        path = tmp_path / "m.npz"
        with np.load(save_npz(GPTModel(CFG), path)) as archive:
            arrays = {name: archive[name] for name in archive.files}
        np.savez(path, **arrays, **{CARD_KEY: np.array(json.dumps(card))})
        with pytest.raises(BadFileError, match=message):
            read_card(path)
    with pytest.raises(BadFileError, match="src: its model card is not"):
        check_card([], "src")


def test_every_model_file_of_a_run_carries_the_run_s_card(tmp_path):
    run_dir = tmp_path / "run"
    assert train.main(TINY + ["--max-steps", "2", "--out-dir", str(run_dir)]) == 0
    data = {"data": "tasks", "data_seed": 0, "n_train": 24, "n_val": 4, "n_test": 5, "shuffle_seed": None}
    expected = make_card("byte", "phi3", data)                            # the offline recipe's
    assert read_card(run_dir / "model-final.npz") == read_card(run_dir / "model-best.npz") == expected
    assert read_card(run_dir) == expected                                 # a run folder: its final model
