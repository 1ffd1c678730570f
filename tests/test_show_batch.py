"""python train.py --show-batch: the first training batch as the model sees it, from the run's own loader.

Expected ids are worked out here from the prompt templates' literal text: with the byte tokenizer a
token is a UTF-8 byte, so a row's input is the bytes of prompt + output, and its targets are the
same shifted by one, with -100 for the masked prompt and the padding after the first <|endoftext|>.
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest

import train
from minigpt import GPTConfig, GPTModel, is_grad_enabled
from minigpt.files import weights
from minigpt.tokenizer import gpt2_tokenizer
from minigpt.files.weights import save_hf_gpt2, save_npz

GPT2_VOCAB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpt2"
needs_gpt2_vocab = pytest.mark.skipif(not (GPT2_VOCAB / "vocab.bpe").is_file(), reason="GPT-2 vocab absent")
BYTE_EOT = 256
PROMPTS = {  # the templates' text for an entry without input, written out
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request.\n\n### Instruction:\n{}\n\n### Response:\n"),
    "phi3": "<|user|>\n{}\n<|assistant|>:\n",
}
# Outputs of different lengths, so every batch has padding; the instruction tells the rows apart.
ENTRIES = [{"instruction": f"Echo {i}.", "input": "", "output": "ab\ncd"[:1 + i % 5]} for i in range(40)]

ROW = re.compile(r"row (\d+) of (\d+), input text: (.*)")
LITERAL = r"""b?(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
POSITION = re.compile(rf"\s*(\d+)\s+(\d+) {LITERAL}\s+(?:-100|(\d+) {LITERAL})")


def show(capsys, args):
    """Run train.py --show-batch in-process -> (exit code, header line, [(input ids, target ids), ...])."""
    code = train.main(args)
    lines = capsys.readouterr().out.splitlines()
    rows = []
    for line in lines[1:]:
        if ROW.fullmatch(line):
            rows.append(([], []))
        elif (match := POSITION.fullmatch(line)):
            assert int(match[1]) == len(rows[-1][0])  # positions count up from 0
            rows[-1][0].append(int(match[2]))
            rows[-1][1].append(int(match[3]) if match[3] else -100)
    return code, (lines[0] if lines else ""), rows


def data_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ENTRIES))
    return str(path)


def expected_row(input_ids, style, mask_prompt):
    """The entry a row holds (found by its instruction) -> the input and target ids collate must give."""
    text = bytes(i for i in input_ids if i != BYTE_EOT).decode()
    entry = next(e for e in ENTRIES if f"\n{e['instruction']}\n" in text)
    prompt = list(PROMPTS[style].format(entry["instruction"]).encode())
    sequence = prompt + list(entry["output"].encode())
    padding = len(input_ids) - len(sequence)
    inputs = sequence + [BYTE_EOT] * padding
    targets = sequence[1:] + [BYTE_EOT] + [-100] * padding
    if mask_prompt:
        targets[:len(prompt) - 1] = [-100] * (len(prompt) - 1)
    return inputs, targets


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
@pytest.mark.parametrize("mask", ["--mask-prompt", "--no-mask-prompt"])
def test_a_json_dataset_shows_the_masked_prompt_the_response_and_the_padding(tmp_path, capsys, style, mask):
    run_dir = tmp_path / "run"
    code, header, rows = show(capsys, ["--data", data_file(tmp_path), "--batch-size", "5", "--prompt-style",
                                       style, mask, "--context-length", "256",  # no cut in an alpaca prompt
                                       "--show-batch", "3", "--out-dir", str(run_dir)])
    assert code == 0 and not run_dir.exists()
    assert header.startswith("first training batch: 5 rows x ") and f"{style} prompts" in header
    assert len(rows) == 3
    for inputs, targets in rows:
        assert (inputs, targets) == expected_row(inputs, style, mask == "--mask-prompt")
    assert any(targets[-1] == -100 for _, targets in rows)  # at least one row shown is padded


def test_newlines_and_the_end_of_text_are_visible(tmp_path, capsys):
    assert train.main(["--data", data_file(tmp_path), "--batch-size", "4", "--show-batch"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+\d+\s+10 '\\n'\s", out, re.MULTILINE)         # an input "\n", escaped
    assert re.search(r"\s256 '<\|endoftext\|>'$", out, re.MULTILINE)      # the EOT as a target
    assert "row 4 of 4" in out and "row 5" not in out


def test_the_task_dataset_shows_the_default_number_of_rows(capsys):
    code, header, rows = show(capsys, ["--n-train", "40", "--n-val", "4", "--n-test", "4",
                                       "--batch-size", "8", "--show-batch"])
    assert code == 0 and len(rows) == train.SHOW_BATCH_ROWS
    assert "phi3 prompts, prompt masked" in header and "cut at 64 tokens" in header
    for inputs, targets in rows:
        assert inputs[:9] == list(b"<|user|>\n")
        first_target = next(t for t, target in enumerate(targets) if target != -100)
        assert bytes(inputs[first_target - len("\n<|assistant|>:"):first_target + 1]) == b"\n<|assistant|>:\n"


def test_it_is_the_first_batch_the_run_trains_on(tmp_path, capsys, monkeypatch):
    args = ["--data", data_file(tmp_path), "--batch-size", "4", "--seed", "7", "--emb-dim", "16",
            "--n-layers", "1", "--n-heads", "2"]
    code, _, rows = show(capsys, args + ["--show-batch", "4"])
    assert code == 0
    stepped = []  # the batches of optimizer steps; evaluations run under no_grad
    loss = GPTModel.loss

    def recording_loss(self, inputs, targets):
        if is_grad_enabled():
            stepped.append((inputs, targets))
        return loss(self, inputs, targets)

    monkeypatch.setattr(GPTModel, "loss", recording_loss)
    assert train.main(args + ["--max-steps", "1", "--eval-iter", "1", "--max-new-tokens", "1",
                              "--out-dir", str(tmp_path / "run")]) == 0
    assert len(stepped) == 1
    np.testing.assert_array_equal(stepped[0][0], [inputs for inputs, _ in rows])
    np.testing.assert_array_equal(stepped[0][1], [targets for _, targets in rows])


def test_a_weights_file_gives_the_cut_without_loading_its_weights(tmp_path, capsys, monkeypatch):
    path = tmp_path / "tiny.npz"
    save_npz(GPTModel(GPTConfig(vocab_size=257, context_length=24, emb_dim=8, n_heads=2, n_layers=1)), path)
    monkeypatch.setattr(weights, "load_npz", lambda *args: pytest.fail("--show-batch loaded the weights"))
    code, header, rows = show(capsys, ["--weights", str(path), "--prompt-style", "alpaca", "--data",
                                       data_file(tmp_path), "--batch-size", "4", "--show-batch", "1"])
    assert code == 0 and "alpaca prompts, no prompt masking" in header  # the reference recipe
    assert "cut at 24 tokens" in header and len(rows[0][0]) == 24


def test_a_hugging_face_checkpoint_gives_its_context_length(tmp_path, capsys):
    folder = tmp_path / "hf"
    model = GPTModel(GPTConfig(vocab_size=257, context_length=20, emb_dim=8, n_heads=2, n_layers=1))
    save_hf_gpt2(model, folder)
    code, header, rows = show(capsys, ["--weights", str(folder), "--prompt-style", "alpaca", "--data",
                                       data_file(tmp_path), "--batch-size", "4", "--show-batch", "1"])
    assert code == 0 and "cut at 20 tokens" in header and len(rows[0][0]) == 20


@needs_gpt2_vocab
def test_gpt2_tokens_of_a_pretrained_model_without_a_download(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(weights, "pretrained_gpt2", lambda *args: pytest.fail("--show-batch fetched weights"))
    code, header, rows = show(capsys, ["--model", "gpt2-small", "--vocab-dir", str(GPT2_VOCAB), "--data",
                                       data_file(tmp_path), "--mask-prompt", "--show-batch", "2"])
    assert code == 0 and "cut at 1024 tokens" in header and len(rows) == 2
    gpt2 = gpt2_tokenizer(GPT2_VOCAB)
    for inputs, targets in rows:
        entry = next(e for e in ENTRIES if f"\n{e['instruction']}\n" in gpt2.decode(inputs))
        prompt = gpt2.encode(PROMPTS["alpaca"].format(entry["instruction"]))
        response = gpt2.encode(entry["output"])
        assert inputs[:len(prompt) + len(response)] == prompt + response
        kept = [target for target in targets if target != -100]
        assert kept == response + [50256]                       # the first <|endoftext|> stays a target
        assert targets.index(kept[0]) == len(prompt) - 1       # the whole prompt is masked


@pytest.mark.parametrize("args, message", [
    (["--show-batch", "0"], "argument --show-batch: expected a positive integer, got '0'"),
    (["--show-batch", "--resume", "runs/x"], "cannot be combined with --resume"),
    (["--batch-size", "64", "--n-train", "10", "--show-batch"], "10 training entries make no full batch"),
])
def test_bad_uses_are_one_line_errors(capsys, args, message):
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
