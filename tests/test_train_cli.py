"""train.py end to end, in-process and tiny: the run folder, --weights, --resume, Ctrl-C, error lines."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train
from minigpt import GPTConfig, GPTModel
from minigpt.files.checkpoint import read_checkpoint
from minigpt.pipeline.settings import RunConfig
from minigpt.tasks import TASKS
from minigpt.files.weights import save_npz

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--emb-dim", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "64",
        "--n-train", "24", "--n-val", "4", "--n-test", "5", "--batch-size", "4", "--eval-freq", "2",
        "--eval-iter", "1", "--max-new-tokens", "4"]
RUN_FILES = {"config.json", "checkpoint.npz", "history.json", "loss-plot.png", "model-final.npz",
             "model-best.npz", "test-responses.json", "metrics.json", "report.md"}


def read(path):
    return json.loads(Path(path).read_text())


def instruction_file(tmp_path, n=40, word="w"):
    entries = [{"instruction": "Repeat the word.", "input": f"{word}{i}", "output": f"{word}{i}"}
               for i in range(n)]
    path = tmp_path / "tiny-data.json"
    path.write_text(json.dumps(entries))
    return path


def test_default_pipeline_fills_the_run_folder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train.main(TINY + ["--max-steps", "3", "--out-dir", str(run_dir)]) == 0
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES  # and no temporary files
    config = read(run_dir / "config.json")
    assert (config["tokenizer"], config["prompt_style"], config["mask_prompt"]) == ("byte", "phi3", True)
    assert config["max_steps"] == 3 and config["out_dir"] == str(run_dir)
    history = read(run_dir / "history.json")
    assert history["steps"] == [0, 2] and history["tokens_seen"][0] == 0
    assert set(history) >= {"train_loss", "val_loss", "epochs", "tokens_seen"}
    responses = read(run_dir / "test-responses.json")
    assert len(responses) == 5
    assert all(isinstance(e["model_response"], str) and "task" in e for e in responses)
    metrics = read(run_dir / "metrics.json")
    assert 0.0 <= metrics["exact_match"] <= 1.0 and 0.0 <= metrics["rouge_l_f1"] <= 1.0
    assert set(metrics["exact_match_by_task"]) == set(TASKS) and metrics["steps"] == 3
    assert (run_dir / "loss-plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "initial losses (step 0)" in out and "ep 1 (step 000002)" in out and "ETA" in out
    assert "exact match" in out and "uppercase" in out


def test_a_run_folder_is_not_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train.main(TINY + ["--max-steps", "1", "--out-dir", str(run_dir)]) == 0
    assert train.main(TINY + ["--max-steps", "1", "--out-dir", str(run_dir)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_weights_file_with_byte_tokenizer_and_a_json_dataset(tmp_path, capsys):
    weights = tmp_path / "tiny.npz"
    # context 256: alpaca prompts are ~155 bytes, and a shorter context would cut off every response
    save_npz(GPTModel(GPTConfig(vocab_size=257, context_length=256, emb_dim=16, n_heads=2, n_layers=1)),
             weights)
    run_dir = tmp_path / "run"
    args = ["--weights", str(weights), "--prompt-style", "alpaca", "--data", str(instruction_file(tmp_path)),
            "--max-steps", "2", "--eval-freq", "1", "--eval-iter", "1", "--max-new-tokens", "3",
            "--batch-size", "4", "--export-hf", "--judge-model", "llama3",
            "--ollama-url", "http://127.0.0.1:9",  # a closed local port: the judge is skipped
            "--out-dir", str(run_dir)]
    assert train.main(args) == 0
    config = read(run_dir / "config.json")  # the reference recipe, because the run starts from weights
    assert (config["prompt_style"], config["lr"], config["schedule"], config["mask_prompt"]) == (
        "alpaca", 5e-5, "constant", False)
    assert len(read(run_dir / "test-responses.json")) == 4  # 40 entries -> 34 train / 2 val / 4 test
    metrics = read(run_dir / "metrics.json")
    assert metrics["exact_match_by_task"] == {} and metrics["judge"] is None
    assert (run_dir / "model-final-hf" / "model.safetensors").is_file()
    assert (run_dir / "model-best-hf" / "config.json").is_file()
    assert "skipping the LLM judge" in capsys.readouterr().out
    weights.unlink()  # a resumed run needs only its checkpoint
    assert train.main(["--resume", str(run_dir), "--max-steps", "3"]) == 0
    assert read(run_dir / "metrics.json")["steps"] == 3


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, capsys):
    args = TINY + ["--drop-rate", "0.1", "--epochs", "2"]  # 6 batches per epoch -> 12 steps
    assert train.main(args + ["--out-dir", str(tmp_path / "straight")]) == 0
    assert train.main(args + ["--max-steps", "5", "--out-dir", str(tmp_path / "resumed")]) == 0
    assert train.main(["--resume", str(tmp_path / "resumed"), "--max-steps", "0"]) == 0
    assert "resuming at step 5" in capsys.readouterr().out
    straight, resumed = read(tmp_path / "straight/history.json"), read(tmp_path / "resumed/history.json")
    assert straight == resumed and straight["steps"][-1] == 12
    with np.load(tmp_path / "straight/model-final.npz") as a, \
            np.load(tmp_path / "resumed/model-final.npz") as b:
        assert all(np.array_equal(a[name], b[name]) for name in a.files)
    assert train.main(["--resume", str(tmp_path / "resumed"), "--lr", "1"]) == 2
    assert "cannot change lr" in capsys.readouterr().err


def test_ctrl_c_saves_the_run_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    calls = []
    loss = GPTModel.loss

    def interrupted_loss(self, inputs, targets):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return loss(self, inputs, targets)

    monkeypatch.setattr(GPTModel, "loss", interrupted_loss)
    run_dir = tmp_path / "run"
    assert train.main(TINY + ["--out-dir", str(run_dir)]) == 130
    out = capsys.readouterr().out
    assert f"python train.py --resume {run_dir}" in out
    monkeypatch.undo()
    assert (run_dir / "checkpoint.npz").is_file() and not (run_dir / "metrics.json").exists()
    assert train.main(["--resume", str(run_dir), "--max-steps", "3"]) == 0
    assert read(run_dir / "metrics.json")["steps"] == 3


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.json"], "instruction data file not found: missing.json"),
    (["--weights", "missing.npz", "--tokenizer", "byte"], "weights file not found: missing.npz"),
    (["--lr", "-1"], "lr must be a finite number > 0"),
    (["--lr", "fast"], "invalid float value"),
    (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
    (["--grad-clip", "nan"], "grad_clip must be a finite number >= 0 (0: off), got nan"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number >= 0, got nan"),
    (["--batch-size", "0"], "batch_size must be a positive integer"),
    (["--n-heads", "3"], "not divisible"),
    (["--judge-timeout", "0"], "judge_timeout must be a positive number of seconds, got 0.0"),
    (["--judge-timeout", "nan"], "judge_timeout must be a positive number of seconds, got nan"),
    (["--prompt-style", "chatml"], "invalid choice"),
    (["--resume", "nowhere"], "no checkpoint"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--lora-rank", "0"], "LoRA rank must be a positive integer, got 0"),
    (["--lora-rank", "-2"], "LoRA rank must be a positive integer, got -2"),
    (["--lora-rank", "17"], "LoRA rank 17 is larger than layer h.0.attn.c_attn (16 -> 48): at most 16"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "LoRA alpha must be a positive number, got 0.0"),
    (["--lora-rank", "4", "--lora-alpha", "-1"], "LoRA alpha must be a positive number, got -1.0"),
    (["--lora-alpha", "8"], "lora_alpha is set but LoRA is off: give lora_rank too"),
    (["--lora-rank", "two"], "invalid int value"),
    (["--lora-rank", "4", "--lora-alpha", "1e300"],
     "LoRA alpha 1e+300 is too large to train: its scale alpha / rank overflows float32"),
    (["--data", "tasks:swapcase,divide"], "unknown task kind 'divide' in --data tasks:swapcase,divide"),
])
def test_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert train.main(TINY + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_a_json_dataset_too_small_to_split_names_the_parts(tmp_path, capsys):
    assert train.main(["--data", str(instruction_file(tmp_path, n=5)),
                       "--out-dir", str(tmp_path / "run")]) == 2
    assert "4 train / 1 validation / 0 test entries after the 85% / 5% / 10% split" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unknown_model_in_a_real_process_gives_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "gpt3"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "gpt3" in result.stderr and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_every_flag_has_help_and_every_setting_a_flag():
    parser = train.build_parser()
    flags = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert all(action.help for action in flags)
    settings = {field for field in RunConfig.__dataclass_fields__}
    assert settings <= {action.dest for action in flags}


# ---------------------------------------------------------------------------------------------
# Nothing silent: changed data on resume, divergence, prompts that leave no response

def test_resume_refuses_a_data_file_edited_in_place(tmp_path, capsys):
    data, run_dir = instruction_file(tmp_path), tmp_path / "run"
    args = ["--data", str(data), "--out-dir", str(run_dir), "--max-steps", "2"]
    assert train.main(TINY + args) == 0
    entries = json.loads(data.read_text())
    entries[3]["output"] = "v3"                     # same length, another answer
    data.write_text(json.dumps(entries))
    capsys.readouterr()
    assert train.main(["--resume", str(run_dir), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data changed since the run started: fingerprint ") and err.count("\n") == 1
    fingerprints = re.findall(r"fingerprint ([0-9a-f]{12})… in the checkpoint, ([0-9a-f]{12})… now", err)
    assert fingerprints and fingerprints[0][0] != fingerprints[0][1]
    assert str(run_dir / "checkpoint.npz") in err and "training entries" in err


def test_resume_refuses_other_reference_data_in_another_data_dir(tmp_path, capsys):
    for folder, word in (("a", "w"), ("b", "z")):   # where download_instruction_data finds its file
        (tmp_path / folder).mkdir()
        instruction_file(tmp_path, word=word).rename(tmp_path / folder / "instruction-data.json")
    run_dir = tmp_path / "run"
    args = ["--data", "reference", "--data-dir", str(tmp_path / "a"), "--out-dir", str(run_dir)]
    assert train.main(TINY + args + ["--max-steps", "2"]) == 0
    assert train.main(["--resume", str(run_dir), "--data-dir", str(tmp_path / "b")]) == 2
    assert "data changed since the run started" in capsys.readouterr().err
    assert train.main(["--resume", str(run_dir), "--data-dir", str(tmp_path / "a"), "--max-steps", "3"]) == 0


def test_divergence_stops_at_the_first_non_finite_loss_and_keeps_finite_files(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train.main(TINY + ["--lr", "1e6", "--grad-clip", "0", "--eval-freq", "1",
                              "--out-dir", str(run_dir)]) == train.EXIT_DIVERGED == 3
    captured = capsys.readouterr()
    step = int(re.search(r"training diverged: the (?:training|validation) loss (?:of|after) step (\d+) is "
                         r"(?:nan|inf|-inf)", captured.err).group(1))
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert "--lr" in captured.err and "--grad-clip" in captured.err
    assert not (run_dir / "model-final.npz").exists() and not (run_dir / "metrics.json").exists()
    for name in ("checkpoint.npz", "model-best.npz"):  # the last finite ones, never overwritten
        with np.load(run_dir / name) as archive:
            assert all(np.isfinite(archive[key]).all() for key in archive.files
                       if archive[key].dtype.kind == "f"), name
    state = read_checkpoint(run_dir / "checkpoint.npz")["train_state"]
    assert state["step"] < step and all(np.isfinite(state["history"]["val_loss"]))

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    for path in run_dir.glob("*.json"):  # strict JSON: no NaN or Infinity
        json.loads(path.read_text(), parse_constant=refuse)


def test_prompts_longer_than_the_context_are_counted_before_training(tmp_path, capsys):
    entries = [{"instruction": "Repeat the word." + " please" * (8 if i % 4 == 0 else 0), "input": f"w{i}",
                "output": f"w{i}"} for i in range(40)]
    data = tmp_path / "long.json"
    data.write_text(json.dumps(entries))
    args = TINY + ["--data", str(data), "--max-steps", "1"]  # prompts of ~45 bytes, every 4th ~100
    assert train.main(args + ["--out-dir", str(tmp_path / "some")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"warning: \d+ of 34 training examples lose their whole response to the cut at 64 "
                     r"tokens", out)
    assert train.main(args + ["--context-length", "40", "--out-dir", str(tmp_path / "most")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: \d+ of 34 training examples lose their whole response to the cut at 40 tokens",
                     err) and "--context-length" in err


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_a_tokenizer_smaller_than_the_model_is_refused_before_training(tmp_path, capsys, method):
    """A 257-id byte tokenizer with a 50,257-row model trained, then failed to decode the test responses
    (a KeyError at the very end, on every --resume too): the pair is refused before anything trains."""
    weights = tmp_path / "gpt2-vocab.npz"
    save_npz(GPTModel(GPTConfig(vocab_size=50257, context_length=64, emb_dim=8, n_heads=2, n_layers=1)),
             weights)
    data = instruction_file(tmp_path)
    if method == "dpo":
        entries = [dict(entry, chosen=entry["output"], rejected="x") for entry in read(data)]
        data.write_text(json.dumps(entries))
    run_dir = tmp_path / "run"
    args = ["--method", method, "--weights", str(weights), "--tokenizer", "byte", "--data", str(data),
            "--prompt-style", "phi3", "--max-steps", "2", "--out-dir", str(run_dir)]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err == ("error: the byte tokenizer has 257 tokens but the model's vocabulary has 50257; use the "
                   "tokenizer the model was trained with (--tokenizer)\n")
    assert not (run_dir / "checkpoint.npz").exists() and not (run_dir / "model-best.npz").exists()


def test_a_checkpoint_from_before_beta_was_dpo_s_alone_still_resumes(tmp_path, capsys):
    """Fine-tuning runs used to record DPO's defaults (beta 0.1, nll_weight 0); their checkpoints resume."""
    run_dir = tmp_path / "run"
    assert train.main(TINY + ["--max-steps", "2", "--out-dir", str(run_dir)]) == 0
    path = run_dir / "checkpoint.npz"
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    state = json.loads(str(arrays["state"][()]))
    state["run_config"].update(beta=0.1, nll_weight=0.0)
    arrays["state"] = np.array(json.dumps(state))
    np.savez(path, **arrays)
    assert train.main(["--resume", str(run_dir), "--max-steps", "3"]) == 0
    assert read(run_dir / "metrics.json")["steps"] == 3 and read(run_dir / "config.json")["beta"] is None
