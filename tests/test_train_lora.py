"""train.py --lora-rank end to end, in-process and tiny: the run folder (adapters alone, merged
weights), Adam's state for the adapters only, exact resume, a selection of task kinds. (Bad LoRA
settings: test_train_cli.test_errors_are_one_line_and_exit_2.)"""
import json

import numpy as np
import pytest

import train
from minigpt import GPTConfig, GPTModel, lora
from minigpt.files.weights import CARD_KEY, CONFIG_KEY, load_npz, load_weights, save_npz
from minigpt.files.adapters import ADAPTERS_KEY, load_adapters
from test_train_cli import RUN_FILES, TINY, read

LORA_FILES = RUN_FILES | {"adapters-final.npz", "adapters-best.npz"}
BASE = GPTConfig(vocab_size=257, context_length=64, emb_dim=16, n_heads=2, n_layers=2)
# the tiny task runs of test_train_cli from a --weights base, with the offline recipe's prompts
TASK_RUN = ["--n-train", "24", "--n-val", "4", "--n-test", "5", "--batch-size", "4", "--eval-freq", "2",
            "--eval-iter", "1", "--max-new-tokens", "4", "--tokenizer", "byte", "--prompt-style", "phi3",
            "--mask-prompt", "--lr", "2e-3", "--data", "tasks"]


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "base.npz"
    save_npz(GPTModel(BASE, seed=5), path)
    return path


def arrays(path):
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def merged(base_file, adapters):
    """The base with the adapters applied and merged, as an independent reader would make it."""
    model = load_weights(base_file)
    load_adapters(model, adapters)
    return lora.merge_lora(model)


def test_a_lora_run_keeps_the_adapters_alone_and_merged_weights(tmp_path, base_file, capsys):
    run_dir = tmp_path / "run"
    assert train.main(TASK_RUN + ["--weights", str(base_file), "--lora-rank", "2", "--lora-alpha", "4",
                                  "--max-steps", "5", "--export-hf", "--out-dir", str(run_dir)]) == 0
    assert {p.name for p in run_dir.iterdir()} == LORA_FILES | {"model-final-hf", "model-best-hf"}
    n_adapters = 2 * 4 * BASE.n_layers                                    # A and B of 4 layers per block
    n_trainable = BASE.n_layers * 2 * (16 + 48 + 16 + 16 + 16 + 64 + 64 + 16)  # r (in + out) per layer
    n_total = sum(p.size for p in load_weights(base_file).parameters()) + n_trainable
    out = capsys.readouterr().out
    assert f"trainable {n_trainable:,} of {n_total:,} ({100 * n_trainable / n_total:.2f}%)" in out
    assert "LoRA: rank 2, alpha 4 (scale 2) on 8 layers" in out and "adapters-final.npz: " in out

    final = arrays(run_dir / "model-final.npz")                           # a plain GPT-2 .npz ...
    expected = merged(base_file, run_dir / "adapters-final.npz").state_dict()
    assert set(final) == {*expected, CONFIG_KEY, CARD_KEY}  # GPT-2 names, the config, the card
    for name, value in expected.items():
        np.testing.assert_array_equal(final[name], value, err_msg=name)   # ... = base + final adapters
    base = load_weights(base_file).state_dict()
    assert not np.array_equal(final["h.0.mlp.c_fc.weight"], base["h.0.mlp.c_fc.weight"])  # they trained
    for name in ("wte.weight", "h.1.ln_2.bias", "h.1.attn.c_attn.bias"):  # frozen: exactly the base
        np.testing.assert_array_equal(final[name], base[name])
    best_step = read(run_dir / "metrics.json")["best_step"]
    best = merged(base_file, run_dir / "adapters-best.npz")
    np.testing.assert_array_equal(load_npz(run_dir / "model-best.npz").h[1].mlp.c_proj.weight.data,
                                  best.h[1].mlp.c_proj.weight.data)
    assert load_weights(run_dir / "model-best-hf").num_parameters() == best.num_parameters()
    with np.load(run_dir / "adapters-final.npz") as archive:
        meta = json.loads(str(archive[ADAPTERS_KEY][()]))
    assert (meta["rank"], meta["alpha"], len(meta["layers"])) == (2, 4.0, 4 * BASE.n_layers)

    checkpoint = arrays(run_dir / "checkpoint.npz")                       # Adam's m and v: adapters only
    moments = [name for name in checkpoint if name.startswith("optimizer/exp_avg/")]
    assert len(moments) == n_adapters
    assert sum(checkpoint[name].size for name in moments) == n_trainable
    metrics = read(run_dir / "metrics.json")
    assert metrics["lora"]["trainable_parameters"] == n_trainable and best_step is not None
    assert metrics["lora"]["adapters_bytes"] == (run_dir / "adapters-final.npz").stat().st_size


def test_an_interrupted_lora_run_resumes_exactly(tmp_path, base_file, capsys):
    args = TASK_RUN + ["--weights", str(base_file), "--lora-rank", "3", "--drop-rate", "0.1",
                       "--epochs", "2"]
    assert train.main(args + ["--out-dir", str(tmp_path / "straight")]) == 0  # 6 batches per epoch: 12 steps
    assert train.main(args + ["--max-steps", "5", "--out-dir", str(tmp_path / "resumed")]) == 0
    base_file.rename(base_file.with_suffix(".gone"))              # resuming needs the checkpoint alone
    try:
        assert train.main(["--resume", str(tmp_path / "resumed"), "--max-steps", "0"]) == 0
    finally:
        base_file.with_suffix(".gone").rename(base_file)
    assert "resuming at step 5" in capsys.readouterr().out
    straight, resumed = read(tmp_path / "straight/history.json"), read(tmp_path / "resumed/history.json")
    assert straight == resumed and straight["steps"][-1] == 12
    for name in ("model-final.npz", "model-best.npz", "adapters-final.npz", "adapters-best.npz"):
        a, b = arrays(tmp_path / "straight" / name), arrays(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    assert train.main(["--resume", str(tmp_path / "resumed"), "--lora-rank", "4"]) == 2
    assert "cannot change lora_rank" in capsys.readouterr().err


def test_a_selection_of_task_kinds_trains_and_tests_on_those_kinds(tmp_path):
    run_dir = tmp_path / "run"
    assert train.main(TINY + ["--data", "tasks:swapcase,add", "--lora-rank", "2", "--max-steps", "2",
                              "--out-dir", str(run_dir)]) == 0
    assert read(run_dir / "config.json")["data"] == "tasks:swapcase,add"
    assert {entry["task"] for entry in read(run_dir / "test-responses.json")} == {"swapcase", "add"}
    assert set(read(run_dir / "metrics.json")["exact_match_by_task"]) == {"swapcase", "add"}
