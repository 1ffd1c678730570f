"""train.py --method dpo end to end, in-process and tiny: the run folder, the cached reference
log-probabilities, rising reward margins, exact resume, LoRA, --show-batch, and one-line errors."""
import json

import numpy as np
import pytest

import train
from minigpt import GPTConfig, GPTModel, dpo
from minigpt.files.reference_logprobs import SPLITS
from minigpt.pipeline import dpo_run, steps
from minigpt.pipeline.settings import RunConfig
from minigpt.preference import PreferenceDataset
from minigpt.tokenizer import get_tokenizer
from minigpt.files.weights import load_weights, save_npz
from test_train_cli import RUN_FILES, read

DPO_FILES = RUN_FILES | {dpo_run.REFERENCE_NAME}
BASE = GPTConfig(vocab_size=257, context_length=64, emb_dim=16, n_heads=2, n_layers=1)
N_PAIRS = 40  # 34 train / 2 val / 4 test


def pairs(n=N_PAIRS):
    """Repeat-the-word pairs: chosen is the word, rejected a near miss (reversed, one letter more)."""
    return [{"instruction": "Repeat the word.", "input": f"w{i}", "output": f"w{i}", "chosen": f"w{i}",
             "rejected": f"{i}wx"} for i in range(n)]


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "base.npz"
    save_npz(GPTModel(BASE, seed=5), path)
    return path


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs()))
    return path


def dpo_args(base_file, pairs_file, run_dir, *more):
    return ["--method", "dpo", "--weights", str(base_file), "--data", str(pairs_file), "--tokenizer", "byte",
            "--prompt-style", "phi3", "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "1",
            "--max-new-tokens", "4", "--lr", "3e-3", "--out-dir", str(run_dir), *more]


def arrays(path):
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def test_a_dpo_run_fills_the_run_folder_and_raises_the_margin(tmp_path, base_file, pairs_file, capsys):
    run_dir = tmp_path / "run"
    assert train.main(dpo_args(base_file, pairs_file, run_dir)) == 0
    assert {p.name for p in run_dir.iterdir()} == DPO_FILES
    config = read(run_dir / "config.json")
    assert (config["method"], config["beta"], config["epochs"]) == ("dpo", 0.1, 1)  # DPO_RECIPE's
    history = read(run_dir / "history.json")
    assert history["steps"] == [0, 2, 4, 6, 8]                        # 34 pairs: 8 batches of 4
    for split in ("train", "val"):
        margins, accuracies = history[f"{split}_reward_margin"], history[f"{split}_reward_accuracy"]
        assert margins[0] == pytest.approx(0, abs=1e-6)                # policy = reference at step 0
        assert margins[-1] > 0.03 and accuracies[-1] == 1.0, (split, margins, accuracies)
        assert history[f"{split}_loss"][0] == pytest.approx(np.log(2), abs=1e-5)  # -log sigmoid(0)
        assert history[f"{split}_loss"][-1] < 0.68
    metrics = read(run_dir / "metrics.json")
    test = metrics["dpo"]["test"]
    assert metrics["dpo"]["beta"] == 0.1 and test["reward_accuracy"] == 1.0 and test["reward_margin"] > 0.03
    assert set(test) == {"loss", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"}
    assert metrics["steps"] == 8 and len(read(run_dir / "test-responses.json")) == 4
    assert (run_dir / "loss-plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert out.startswith("memory: about ") and " for 8 x " in out  # 4 pairs: 8 sequences in a step
    assert "34 train / 2 val / 4 test preference pairs" in out and "DPO beta 0.1" in out
    assert "reward margin train" in out and "reward accuracy train" in out and "ETA" in out
    assert "test pairs (4): DPO loss" in out


def test_the_reference_log_probabilities_are_the_starting_model_s(tmp_path, base_file, pairs_file):
    run_dir = tmp_path / "run"
    assert train.main(dpo_args(base_file, pairs_file, run_dir, "--max-steps", "2")) == 0
    stored = arrays(run_dir / dpo_run.REFERENCE_NAME)
    config = RunConfig(**read(run_dir / "config.json"))
    tokenizer = get_tokenizer("byte")
    for split, entries in zip(SPLITS, dpo_run.load_splits(config.data, config.data_dir, config.shuffle_seed)):
        dataset = PreferenceDataset(entries, tokenizer, "phi3", allowed_max_length=BASE.context_length)
        expected = dpo.reference_logprobs(load_weights(base_file), dataset, batch_size=3)  # other batches
        np.testing.assert_allclose(stored[f"{split}/chosen"], expected.chosen, rtol=1e-5, err_msg=split)
        np.testing.assert_allclose(stored[f"{split}/rejected"], expected.rejected, rtol=1e-5, err_msg=split)
    final = load_weights(run_dir / "model-final.npz").state_dict()
    assert not np.array_equal(final["wte.weight"], load_weights(base_file).state_dict()["wte.weight"])


def test_an_interrupted_dpo_run_resumes_exactly(tmp_path, base_file, pairs_file, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(dpo_args(base_file, pairs_file, whole)) == 0
    assert train.main(dpo_args(base_file, pairs_file, parts, "--max-steps", "3")) == 0
    capsys.readouterr()
    assert train.main(["--resume", str(parts), "--max-steps", "0"]) == 0
    assert "reference log-probabilities of" not in capsys.readouterr().out  # read back, not recomputed
    for name, value in arrays(whole / "model-final.npz").items():
        np.testing.assert_array_equal(arrays(parts / "model-final.npz")[name], value, err_msg=name)
    assert read(parts / "history.json") == read(whole / "history.json")
    assert read(parts / "metrics.json")["dpo"] == read(whole / "metrics.json")["dpo"]


def test_resume_needs_the_run_s_own_reference_log_probabilities(tmp_path, base_file, pairs_file, capsys):
    run_dir = tmp_path / "run"
    assert train.main(dpo_args(base_file, pairs_file, run_dir, "--max-steps", "2")) == 0
    path = run_dir / dpo_run.REFERENCE_NAME
    stored = arrays(path)
    meta = json.loads(str(stored["meta"][()]))
    meta["fingerprints"]["val"] = "0" * 16                              # as if made for other pairs
    with open(path, "wb") as f:
        np.savez(f, **dict(stored, meta=np.array(json.dumps(meta))))
    capsys.readouterr()
    assert train.main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "of other val pairs" in err and err.count("\n") == 1
    path.unlink()
    assert train.main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{path} is missing" in err and err.count("\n") == 1


def test_scores_compare_the_responses_with_the_chosen_response(tmp_path, base_file, monkeypatch):
    entries = [dict(entry, output="unused") for entry in pairs()]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(entries))
    monkeypatch.setattr(steps, "generate_responses",                 # a model that answers perfectly
                        lambda model, tokenizer, entries, *args, **kwargs: [e["chosen"] for e in entries])
    run_dir = tmp_path / "run"
    assert train.main(dpo_args(base_file, data, run_dir, "--max-steps", "1")) == 0
    assert read(run_dir / "metrics.json")["exact_match"] == 1.0
    assert all(e["output"] == "unused" for e in read(run_dir / "test-responses.json"))  # as given


def test_dpo_with_lora_trains_the_adapters_only(tmp_path, base_file, pairs_file):
    run_dir = tmp_path / "run"
    assert train.main(dpo_args(base_file, pairs_file, run_dir, "--lora-rank", "2", "--lr", "1e-2")) == 0
    assert {p.name for p in run_dir.iterdir()} == DPO_FILES | {"adapters-final.npz", "adapters-best.npz"}
    base, final = load_weights(base_file).state_dict(), load_weights(run_dir / "model-final.npz").state_dict()
    np.testing.assert_array_equal(final["wte.weight"], base["wte.weight"])       # frozen
    assert not np.array_equal(final["h.0.mlp.c_fc.weight"], base["h.0.mlp.c_fc.weight"])  # merged adapters
    assert read(run_dir / "history.json")["val_reward_margin"][-1] > 0


def test_show_batch_puts_each_pair_s_chosen_and_rejected_rows_together(tmp_path, base_file, pairs_file,
                                                                       capsys):
    assert train.main(dpo_args(base_file, pairs_file, tmp_path / "run", "--show-batch", "2")) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    header, *lines = out.splitlines()
    assert header.startswith("first training batch: 8 rows x ") and "chosen row, then its rejected" in header
    texts = [line.split("input text: ")[1] for line in lines if line.startswith("row ")]
    assert len(texts) == 2
    chosen, rejected = (text.split("<|assistant|>:\\n")[1].split("'")[0] for text in texts)
    assert texts[0].split("<|assistant|>")[0] == texts[1].split("<|assistant|>")[0]  # one prompt
    word = chosen
    assert rejected == f"{word[1:]}wx"                                  # the same pair's near miss


@pytest.mark.parametrize("args, message", [
    (["--weights"], "DPO tunes a model that was fine-tuned first"),       # left out
    (["--data", "tasks"], "DPO trains on preference pairs"),
    (["--beta", "0"], "beta must be a positive number, got 0.0"),
    (["--nll-weight", "-1"], "nll_weight must be a finite number >= 0 (0: plain DPO), got -1.0"),
    (["--group-by-length"], "DPO batches pairs in their order"),
    (["--data", "missing.json"], "preference data file not found: missing.json"),
])
def test_bad_dpo_settings_are_one_line_and_exit_2(tmp_path, base_file, pairs_file, capsys, monkeypatch, args,
                                                  message):
    monkeypatch.chdir(tmp_path)
    argv = dpo_args(base_file, pairs_file, tmp_path / "run")
    if args == ["--weights"]:
        i = argv.index("--weights")
        del argv[i:i + 2]
    else:
        argv += args                                                    # the last value of a flag counts
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_the_nll_weight_is_kept_in_the_run_and_refused_for_fine_tuning(tmp_path, base_file, pairs_file,
                                                                       capsys):
    run_dir = tmp_path / "run"
    assert train.main(dpo_args(base_file, pairs_file, run_dir, "--nll-weight", "1", "--max-steps", "2")) == 0
    assert read(run_dir / "config.json")["nll_weight"] == 1.0
    history = read(run_dir / "history.json")
    for split in ("train", "val"):                                    # the total is the DPO loss + the NLL
        assert np.allclose(history[f"{split}_loss"],
                           np.add(history[f"{split}_dpo_loss"], history[f"{split}_chosen_nll"]))
    metrics = read(run_dir / "metrics.json")
    test = metrics["dpo"]["test"]
    assert metrics["dpo"]["nll_weight"] == 1.0 and test["chosen_nll"] > 0
    assert test["loss"] == pytest.approx(test["dpo_loss"] + test["chosen_nll"])
    out = capsys.readouterr().out
    assert "chosen NLL weight 1" in out and f"test pairs (4): DPO loss {test['dpo_loss']:.3f}," in out
    assert train.main(["--nll-weight", "1", "--out-dir", str(tmp_path / "sft")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --nll-weight is a setting of --method dpo, not of --method sft")
    assert err.count("\n") == 1
    assert not (tmp_path / "sft").exists()


@pytest.mark.parametrize("value", ["0.5", "nan"])
def test_beta_with_fine_tuning_is_refused_naming_it(tmp_path, capsys, value):
    """--beta is DPO's: fine-tuning would record it in config.json and ignore it without a word."""
    assert train.main(["--beta", value, "--out-dir", str(tmp_path / "sft")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --beta is a setting of --method dpo, not of --method sft")
    assert err.count("\n") == 1
    assert not (tmp_path / "sft").exists()


def test_a_pair_without_a_rejected_response_is_named(tmp_path, base_file, capsys):
    entries = pairs()
    del entries[7]["rejected"]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(entries))
    assert train.main(dpo_args(base_file, data, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "7" in err and "rejected" in err and err.count("\n") == 1


def test_resume_refuses_a_reference_cache_of_another_reference_model(tmp_path, base_file, pairs_file, capsys):
    """The same pairs scored by another model: the fingerprints of the pairs match, the DPO loss would not."""
    other_base = tmp_path / "other.npz"
    save_npz(GPTModel(BASE, seed=6), other_base)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert train.main(dpo_args(base_file, pairs_file, ours, "--max-steps", "2")) == 0
    assert train.main(dpo_args(other_base, pairs_file, theirs, "--max-steps", "2")) == 0
    capsys.readouterr()
    (ours / dpo_run.REFERENCE_NAME).write_bytes((theirs / dpo_run.REFERENCE_NAME).read_bytes())
    assert train.main(["--resume", str(ours), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "computed with another reference model" in err


@pytest.mark.parametrize("flag, value, message", [
    ("--beta", "1e300", "beta 1e+300 is too large to train"),
    ("--nll-weight", "1e300", "nll_weight 1e+300 is too large to train"),
    ("--beta", "nan", "beta must be a positive number, got nan"),
])
def test_settings_that_cannot_train_are_refused_before_the_run(tmp_path, base_file, pairs_file, capsys,
                                                               flag, value, message):
    assert train.main(dpo_args(base_file, pairs_file, tmp_path / "run", flag, value)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_divergence_names_the_dpo_settings_that_can_cause_it(tmp_path, base_file, pairs_file, capsys):
    """Not only the learning rate: DPO's beta and NLL weight scale its gradient too."""
    args = dpo_args(base_file, pairs_file, tmp_path / "run", "--lr", "1e30", "--lora-rank", "2")
    assert train.main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: training diverged: ") and err.count("\n") == 1
    assert ("lower the learning rate (--lr, now 1e+30), clip the gradient norm (--grad-clip, now off), lower "
            "--beta (now 0.1), lower --nll-weight (now 0) or lower --lora-alpha (now 2)") in err


def test_a_prompt_that_fills_the_context_leaves_its_pair_out_with_a_count(tmp_path, base_file, capsys):
    """DPO follows fine-tuning's rule: one long prompt (of 1,100 of rasbt's, one is 283 tokens) no longer
    refuses the whole file; the pair is left out and counted, and more than half is an error."""
    entries = pairs()
    entries[3]["instruction"] = "Repeat the word, please. " * 4   # > 64 bytes: fills the context
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(entries))
    run_dir = tmp_path / "run"
    assert train.main(dpo_args(base_file, data, run_dir, "--max-steps", "1")) == 0
    out = capsys.readouterr().out
    assert ("warning: 1 of 34 training pairs lose their whole responses to the cut at 64 tokens (their "
            "prompt alone is longer), so they are left out") in out
    assert "33 / 2 / 4 train / val / test pairs" in out
    for entry in entries[:20]:
        entry["instruction"] = "Repeat the word, please. " * 4
    data.write_text(json.dumps(entries))
    assert train.main(dpo_args(base_file, data, tmp_path / "more", "--max-steps", "1")) == 2
    assert "20 of 34 training pairs lose" in capsys.readouterr().err


def test_pairs_without_a_preference_are_counted_and_all_of_them_refused(tmp_path, base_file, capsys):
    entries = pairs()
    entries[5]["rejected"] = entries[5]["chosen"]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(entries))
    assert train.main(dpo_args(base_file, data, tmp_path / "run", "--max-steps", "1")) == 0
    assert ("warning: 1 of 34 training pairs have the same chosen and rejected response; they teach nothing"
            in capsys.readouterr().out)
    data.write_text(json.dumps([dict(entry, rejected=entry["chosen"]) for entry in entries]))
    assert train.main(dpo_args(base_file, data, tmp_path / "all", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: every one of the 34 training pairs has the same chosen and rejected")
