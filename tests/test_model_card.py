"""Model cards: every model file a run writes says its tokenizer and template; old files have none."""
import json

import numpy as np
import pytest

import train
from minigpt import GPTConfig, GPTModel
from minigpt.files import convert
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


# ---------------------------------------------------------------------------------------------
# train.py --weights: the card's settings

@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """A finished tiny default run: byte tokenizer, phi3 prompts, the tasks, its card on its models."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    assert train.main(TINY + ["--max-steps", "1", "--data-seed", "3", "--out-dir", str(run_dir)]) == 0
    return run_dir


def test_weights_with_a_card_fine_tune_on_its_tokenizer_template_and_data(default_run):
    """The --weights recipe (rasbt's, for OpenAI's GPT-2) must not override what the model file knows."""
    config = train.config_from_flags({"weights": str(default_run / "model-final.npz"), "lora_rank": 4})
    assert (config.tokenizer, config.prompt_style) == ("byte", "phi3")
    assert config.data_settings() == read_card(default_run)["data"]        # its data, split as it was
    assert (config.lr, config.batch_size, config.mask_prompt) == (5e-5, 8, False)   # still the recipe's
    given = train.config_from_flags({"weights": str(default_run / "model-final.npz"), "data": "tasks:add",
                                     "n_train": 8, "tokenizer": "byte"})
    assert (given.data, given.n_train, given.data_seed) == ("tasks:add", 8, 3)
    dpo = train.config_from_flags({"method": "dpo", "weights": str(default_run / "model-final.npz")})
    assert (dpo.tokenizer, dpo.prompt_style, dpo.data) == ("byte", "phi3", "reference")  # pairs: its own


def test_a_run_folder_is_its_final_model(default_run, capsys):
    assert train.main(["--weights", str(default_run), "--show-batch", "1"]) == 0
    assert "phi3 prompts, no prompt masking" in capsys.readouterr().out      # its card, the recipe's masking


@pytest.mark.parametrize("flag, value, card_value", [("--tokenizer", "gpt2", "byte"),
                                                     ("--prompt-style", "chat", "phi3")])
def test_a_setting_that_contradicts_the_card_is_refused_naming_both(default_run, capsys, flag, value,
                                                                    card_value):
    weights = str(default_run / "model-final.npz")
    assert train.main(["--weights", weights, flag, value, "--show-batch"]) == 2
    assert capsys.readouterr().err == (f"error: {flag} {value} contradicts the model card of {weights}: it "
                                       f"was trained with {flag} {card_value}; leave {flag} out\n")


def test_a_file_without_a_card_implies_its_tokenizer_and_asks_for_its_template(tmp_path, capsys):
    weights = save_npz(GPTModel(CFG), tmp_path / "old.npz")                 # written before cards
    assert train.main(["--weights", str(weights), "--show-batch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {weights} has no model card") and "give --prompt-style" in err
    assert err.count("\n") == 1
    config = train.config_from_flags({"weights": str(weights), "prompt_style": "chat"})
    assert (config.tokenizer, config.prompt_style, config.data) == ("byte", "chat", "reference")


def test_a_hugging_face_export_carries_the_card_and_converting_keeps_it(default_run, tmp_path):
    card = read_card(default_run)
    folder = tmp_path / "hf"
    assert convert.main([str(default_run / "model-final.npz"), str(folder)]) == 0
    assert read_card(folder) == read_card(folder / "model.safetensors") == card
    assert json.loads((folder / "config.json").read_text())["minigpt"] == card
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert convert.main([str(folder), str(tmp_path / "back.npz")]) == 0
    assert read_card(tmp_path / "back.npz") == card
    config = train.config_from_flags({"weights": str(folder)})             # an export is read as the npz
    assert (config.tokenizer, config.prompt_style) == ("byte", "phi3")
