"""generate.py: the CLI prints exactly minigpt.generate's continuation, streamed, and fails in one line.

Every model here is tiny, random and written by the test itself (byte tokenizer, vocabulary 257);
the GPT-2 tokenizer tests use the shared BPE files and skip without them. No network.
"""
import importlib.util
import io
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minigpt import generate, lora
from minigpt.files import weights
from minigpt.prompts import format_input, response_header
from minigpt.generation import generate_tokens
from minigpt.model import GPTConfig, GPTModel
from minigpt.optim import Adam
from minigpt.tokenizer import EOT, VOCAB_DIR_ENV, encode, get_tokenizer
from minigpt.files.weights import load_weights, save_hf_gpt2, save_npz
from minigpt.files.adapters import save_adapters
from minigpt.files.model_card import make_card
from test_chat_session import chatty_model

REPO_ROOT = Path(__file__).resolve().parents[1]
GPT2_VOCAB_DIR = REPO_ROOT.parent / "shared" / "data" / "gpt2"
needs_vocab = pytest.mark.skipif(not (GPT2_VOCAB_DIR / "vocab.bpe").is_file(),
                                 reason=f"GPT-2 tokenizer files not found in {GPT2_VOCAB_DIR}")
TINY = dict(context_length=32, emb_dim=16, n_heads=2, n_layers=1)
N_NEW = 12  # tokens per test generation: enough to see text, cheap on a shared CPU
TEXT = "The cat sat. é€🤖 The cat sat on the mat."

_spec = importlib.util.spec_from_file_location("generate_cli", REPO_ROOT / "generate.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def memorizing_model(steps=60):
    """A tiny byte-vocabulary model that has memorized TEXT (half a second of Adam), so greedy
    output is real text (with multi-byte characters), not one random byte repeated."""
    model = GPTModel(GPTConfig(vocab_size=257, **TINY), seed=3)
    ids = np.array([list(TEXT.encode("utf-8"))[:TINY["context_length"] + 1]])   # (1, T + 1)
    optimizer = Adam(model.parameters(), lr=3e-2)
    for _ in range(steps):
        model.zero_grad()
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        optimizer.step()
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny byte-vocabulary model saved as .npz and as a Hugging Face directory."""
    folder = tmp_path_factory.mktemp("weights")
    model = memorizing_model()
    save_npz(model, folder / "m.npz")
    save_hf_gpt2(model, folder / "hf")
    return {"npz": folder / "m.npz", "hf": folder / "hf", "model": load_weights(folder / "m.npz")}


def expected_text(model, tokenizer, prompt, max_new_tokens=N_NEW, temperature=0.0, top_k=None, seed=None):
    """What the CLI must print: minigpt.generate's new tokens up to <|endoftext|>, decoded."""
    ids = encode(tokenizer, prompt) or [tokenizer.eot_token]  # an empty prompt starts from <|endoftext|>
    out = generate(model, np.array([ids]), max_new_tokens, temperature=temperature, top_k=top_k,
                   eos_id=tokenizer.eot_token, rng=np.random.default_rng(seed))
    new = out[0, len(ids):].tolist()
    if tokenizer.eot_token in new:
        new = new[:new.index(tokenizer.eot_token)]
    return tokenizer.decode(new)


def run_cli(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------- output = generate()

@pytest.mark.parametrize("fmt", ["npz", "hf", "hf file"])
def test_greedy_output_is_the_decoded_generate_continuation(checkpoints, capsys, fmt):
    path = checkpoints["hf"] / "model.safetensors" if fmt == "hf file" else checkpoints[fmt]
    code, out, err = run_cli(["--weights", path, "--prompt", "The cat", "--max-new-tokens", N_NEW], capsys)
    assert (code, err) == (0, "")
    expected = expected_text(checkpoints["model"], get_tokenizer("byte"), "The cat")
    assert expected.startswith(" sat. é€")  # the memorized text: the comparison means something
    assert out == expected + "\n"


def test_prompt_longer_than_the_context_is_cropped_to_its_end(checkpoints, capsys):
    prompt = TEXT + " ." * 10  # 75 bytes > context 32
    code, out, _ = run_cli(["--weights", checkpoints["npz"], "--prompt", prompt, "--max-new-tokens", 5],
                           capsys)
    model, tokenizer = checkpoints["model"], get_tokenizer("byte")
    ids = encode(tokenizer, prompt)
    last, first = tokenizer.decode(ids[-32:]), tokenizer.decode(ids[:32])  # ASCII: re-encodes exactly
    assert expected_text(model, tokenizer, last, 5) != expected_text(model, tokenizer, first, 5)  # can tell
    assert code == 0 and out == expected_text(model, tokenizer, last, 5) + "\n"


def test_seeded_sampling_is_reproducible(checkpoints, capsys):
    argv = ["--weights", checkpoints["npz"], "--prompt", "Hi", "--max-new-tokens", N_NEW,
            "--temperature", 1.5, "--top-k", 50]
    outs = [run_cli(argv + ["--seed", seed], capsys)[1] for seed in (7, 7, 8)]
    assert outs[0] == outs[1] != outs[2]
    tokenizer = get_tokenizer("byte")
    expected = expected_text(checkpoints["model"], tokenizer, "Hi", temperature=1.5, top_k=50, seed=7)
    assert outs[0] == expected + "\n"


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_instruction_is_wrapped_in_the_prompt_style(checkpoints, capsys, style):
    code, out, _ = run_cli(["--weights", checkpoints["npz"], "--instruction", "Name a color.",
                            "--input", "sky", "--prompt-style", style, "--max-new-tokens", N_NEW], capsys)
    prompt = format_input({"instruction": "Name a color.", "input": "sky"}, style) + response_header(style)
    assert code == 0
    assert out == expected_text(checkpoints["model"], get_tokenizer("byte"), prompt) + "\n"


def test_prompt_text_matches_the_fine_tuning_format():
    prompt = cli.prompt_text("Say hi.", "alpaca")
    assert prompt == format_input({"instruction": "Say hi."}) + "\n\n### Response:\n"
    assert prompt.startswith("Below is an instruction") and "### Input" not in prompt
    assert cli.prompt_text("Say hi.", "alpaca", raw=True) == "Say hi."


def test_model_name_loads_the_cached_pretrained_npz(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(weights, "HF_URL", closed_port_url())  # a download attempt would fail
    save_npz(checkpoints["model"], tmp_path / "gpt2-small.npz")
    code, out, _ = run_cli(["--model", "gpt2-small", "--data-dir", tmp_path, "--prompt", "Hello",
                            "--max-new-tokens", N_NEW], capsys)
    assert code == 0 and out == expected_text(checkpoints["model"], get_tokenizer("byte"), "Hello") + "\n"


# ----------------------------------------------------------------------------- interactive mode

def test_interactive_answers_each_line_until_quit(checkpoints, capsys, monkeypatch):
    code, out, err = run_cli(["--weights", checkpoints["npz"], "--interactive", "--prompt-style", "alpaca",
                              "--max-new-tokens", N_NEW], capsys, monkeypatch=monkeypatch,
                             stdin="Name a color.\nCount to three.\nquit\nnever read\n")
    model, tokenizer = checkpoints["model"], get_tokenizer("byte")
    answers = [expected_text(model, tokenizer, cli.prompt_text(line, "alpaca"))
               for line in ("Name a color.", "Count to three.")]
    assert (code, err) == (0, "")  # no prompt marker on stderr when stdin is not a terminal
    assert out == answers[0] + "\n" + answers[1] + "\n"


def test_interactive_raw_stops_at_an_empty_line_or_eof(checkpoints, capsys, monkeypatch):
    argv = ["--weights", checkpoints["npz"], "--interactive", "--raw", "--max-new-tokens", N_NEW]
    expected = expected_text(checkpoints["model"], get_tokenizer("byte"), "Hello") + "\n"
    assert run_cli(argv, capsys, "Hello\n\nnever read\n", monkeypatch)[:2] == (0, expected)
    assert run_cli(argv, capsys, "Hello", monkeypatch)[:2] == (0, expected)  # EOF without a newline


# ----------------------------------------------------------------------------- streaming

def test_text_is_written_while_tokens_are_still_being_generated(checkpoints, monkeypatch):
    events = []  # "token" when generate_tokens yields, "write" when text is printed

    def logged_generate_tokens(*args, **kwargs):
        for ids in generate_tokens(*args, **kwargs):
            events.append("token")
            yield ids

    monkeypatch.setattr(cli, "generate_tokens", logged_generate_tokens)
    tokenizer = get_tokenizer("byte")
    pieces = []

    def write(piece):
        pieces.append(piece)
        events.append("write")

    cli.stream_completion(checkpoints["model"], tokenizer, "Hello", write, max_new_tokens=N_NEW)
    assert "".join(pieces) == expected_text(checkpoints["model"], tokenizer, "Hello")
    last_token = len(events) - 1 - events[::-1].index("token")
    assert events.index("write") < last_token  # printing started before generation ended


def test_characters_split_across_tokens_print_whole_and_eot_stops(checkpoints, monkeypatch):
    tokenizer = get_tokenizer("byte")
    text = "né€🤖!"
    script = list(text.encode("utf-8")) + [tokenizer.eot_token, ord("x")]  # 'x' comes after the end
    monkeypatch.setattr(cli, "generate_tokens",
                        lambda *args, **kwargs: (np.array([i]) for i in script))
    pieces = []
    new_ids = cli.stream_completion(checkpoints["model"], tokenizer, "a", pieces.append)
    assert pieces == ["n", "é", "€", "🤖", "!"]  # one piece per complete character, never a half
    assert new_ids == list(text.encode("utf-8"))


# ----------------------------------------------------------------------------- the GPT-2 tokenizer

@pytest.fixture(scope="module")
def gpt2_vocab_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2vocab") / "m.npz"
    save_npz(GPTModel(GPTConfig(vocab_size=50257, **TINY), seed=1), path)
    return path


@needs_vocab
def test_a_50257_vocabulary_defaults_to_the_gpt2_tokenizer(gpt2_vocab_checkpoint, capsys, monkeypatch):
    model, tokenizer = load_weights(gpt2_vocab_checkpoint), get_tokenizer("gpt2", GPT2_VOCAB_DIR)
    expected = expected_text(model, tokenizer, "The sky is") + "\n"
    argv = ["--weights", gpt2_vocab_checkpoint, "--prompt", "The sky is", "--max-new-tokens", N_NEW]
    assert run_cli(argv + ["--vocab-dir", GPT2_VOCAB_DIR], capsys)[:2] == (0, expected)
    monkeypatch.setenv(VOCAB_DIR_ENV, str(GPT2_VOCAB_DIR))
    assert run_cli(argv, capsys)[:2] == (0, expected)


@needs_vocab
def test_unconditional_generation_starts_from_endoftext(gpt2_vocab_checkpoint, capsys):
    model, tokenizer = load_weights(gpt2_vocab_checkpoint), get_tokenizer("gpt2", GPT2_VOCAB_DIR)
    code, out, _ = run_cli(["--weights", gpt2_vocab_checkpoint, "--prompt", "",
                            "--vocab-dir", GPT2_VOCAB_DIR, "--max-new-tokens", 4], capsys)
    assert code == 0 and out == expected_text(model, tokenizer, "", 4) + "\n"


def test_lora_adapters_are_applied_to_the_base_and_merged(checkpoints, tmp_path, capsys):
    model = load_weights(checkpoints["npz"])
    lora.apply_lora(model, 4, 8)
    rng = np.random.default_rng(0)
    for p in model.parameters(trainable_only=True):
        p.data[...] = 0.5 * rng.standard_normal(p.shape)                  # adapters that change the output
    adapters = save_adapters(model, tmp_path / "adapters.npz")
    tokenizer = get_tokenizer("byte")
    expected = expected_text(model, tokenizer, "The cat")                  # the unmerged LoRA model
    assert expected != expected_text(checkpoints["model"], tokenizer, "The cat")
    code, out, err = run_cli(["--weights", checkpoints["npz"], "--lora", adapters, "--prompt", "The cat",
                              "--max-new-tokens", N_NEW], capsys)
    assert (code, err) == (0, "") and out == expected + "\n"


# ----------------------------------------------------------------------------- model cards and the chat

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder whose model-final.npz has memorized a chat (test_chat_session) and carries its card."""
    folder = tmp_path_factory.mktemp("run")
    save_npz(chatty_model(), folder / "model-final.npz", make_card("byte", "chat"))
    save_npz(chatty_model(), folder / "no-card.npz")
    return folder


def test_a_run_folder_or_its_model_file_needs_no_other_setting(run_dir, capsys, monkeypatch):
    code, out, err = run_cli([run_dir, "--chat"], capsys, "Hi\nAgain\n", monkeypatch)
    assert (code, out) == (0, "Hello!\nHi again.\n")                 # the conversation, markers never shown
    assert err.startswith(f"chat with {run_dir / 'model-final.npz'}: chat template, byte tokenizer")
    code, out, _ = run_cli([run_dir / "model-final.npz", "--instruction", "Hi", "--prompt-style", "chat"],
                           capsys)
    assert (code, out) == (0, "Hello!\n")                               # a flag that agrees with the card


@pytest.mark.parametrize("flag, value, card_says", [("--tokenizer", "gpt2", "byte"),
                                                    ("--prompt-style", "phi3", "chat")])
def test_a_setting_that_contradicts_the_model_card_is_refused_naming_both(run_dir, capsys, flag, value,
                                                                          card_says):
    code, out, err = run_cli([run_dir, "--instruction", "Hi", flag, value], capsys)
    assert (code, out) == (2, "") and err.count("\n") == 1
    file = run_dir / "model-final.npz"
    assert f"{flag} {value} contradicts the model card of {file}, which says {card_says}" in err


def test_a_file_without_a_card_asks_for_its_template_in_one_line(run_dir, capsys, monkeypatch):
    code, out, err = run_cli([run_dir / "no-card.npz", "--chat"], capsys)
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert "has no model card" in err and "give --prompt-style (alpaca, phi3, chat)" in err
    code, out, _ = run_cli([run_dir / "no-card.npz", "--chat", "--prompt-style", "chat"], capsys, "Hi\n",
                           monkeypatch)                                 # the byte tokenizer: 257 tokens
    assert (code, out) == (0, "Hello!\n")


# ----------------------------------------------------------------------------- bad input: one line, exit 2

def closed_port_url():
    """A URL template on a local port nobody listens on: downloads fail at once, offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{{repo}}/{{filename}}"


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, checkpoints):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "text.safetensors").write_text("this is not a safetensors file at all")
    header = b"{not json"
    (folder / "header.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    (folder / "empty_dir").mkdir()
    (folder / "notzip.npz").write_bytes(b"PK but not really")
    save_npz(GPTModel(GPTConfig(vocab_size=100, **TINY)), folder / "v100.npz")
    other_base = GPTModel(GPTConfig(vocab_size=257, **TINY), seed=11)     # same shapes, other weights
    lora.apply_lora(other_base, 2, 2)
    save_adapters(other_base, folder / "other-adapters.npz")
    return folder


OK = ["--weights", "{npz}", "--prompt", "x"]  # a good command line that the cases below spoil
BAD_INPUTS = {
    "missing weights file": (["--weights", "{bad}/missing.npz", "--prompt", "x"], "no such file"),
    "not a safetensors file": (["--weights", "{bad}/text.safetensors", "--prompt", "x"], "text.safetensors"),
    "corrupt header": (["--weights", "{bad}/header.safetensors", "--prompt", "x"], "header.safetensors"),
    "directory without weights": (["--weights", "{bad}/empty_dir", "--prompt", "x"], "model.safetensors"),
    "corrupt npz": (["--weights", "{bad}/notzip.npz", "--prompt", "x"], "notzip.npz"),
    "unknown model name": (["--model", "gpt3", "--prompt", "x"], "gpt3"),
    "no model": (["--prompt", "x"], "--weights"),
    "two models": (["--weights", "{npz}", "--model", "gpt2-small", "--prompt", "x"], "exactly one"),
    "missing prompt": (["--weights", "{npz}"], "--prompt"),
    "two prompts": (OK + ["--instruction", "y"], "exactly one"),
    "input without instruction": (OK + ["--input", "y"], "--input"),
    "raw without interactive": (OK + ["--raw"], "--raw"),
    "negative temperature": (OK + ["--temperature", "-1"], "--temperature"),
    "nan temperature": (OK + ["--temperature", "nan"], "--temperature"),
    "text temperature": (OK + ["--temperature", "hot"], "--temperature"),
    "zero top-k": (OK + ["--top-k", "0"], "--top-k"),
    "fractional top-k": (OK + ["--top-k", "2.5"], "--top-k"),
    "negative max-new-tokens": (OK + ["--max-new-tokens", "-1"], "--max-new"),
    "negative seed": (OK + ["--seed", "-3"], "--seed"),
    "unknown tokenizer": (OK + ["--tokenizer", "bpe"], "--tokenizer"),
    "tokenizer/model vocab mismatch": (OK + ["--tokenizer", "gpt2"], "257"),
    "vocab matching no tokenizer": (["--weights", "{bad}/v100.npz", "--prompt", "x"], "100"),
    "model given twice": (["{npz}", "--weights", "{npz}", "--prompt", "x"], "give the model once"),
    "two modes": (["{npz}", "--chat", "--serve"], "exactly one of"),
    "a folder without a model": (["{bad}/empty_dir", "--prompt", "x"], "neither model-final.npz"),
    "system without chat": (OK + ["--system", "Be brief."], "--system needs --chat"),
    "port without serve": (OK + ["--port", "8001"], "--port needs --serve"),
    "port out of range": (["{npz}", "--serve", "--port", "70000"], "--port must be a port number"),
    "seed with serve": (["{npz}", "--serve", "--seed", "1"], "--seed does not apply to --serve"),
    "unknown prompt style": (["--weights", "{npz}", "--instruction", "x", "--prompt-style", "chat2"],
                             "chat2"),
    "end of text in the prompt": (["--weights", "{npz}", "--prompt", f"a{EOT}b"], f"{EOT!r}"),
    "end of text in an instruction": (["{npz}", "--instruction", EOT, "--prompt-style", "phi3"], "literal"),
    "missing adapters file": (OK + ["--lora", "{bad}/missing.npz"], "adapters file not found"),
    "adapters file not an npz": (OK + ["--lora", "{bad}/notzip.npz"], "not an .npz archive"),
    "adapters for another base": (OK + ["--lora", "{bad}/other-adapters.npz"],
                                  "adapters for a different base: same shapes, but not the weights"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_error_line_and_exit_code_2(case, bad_files, checkpoints, capsys):
    argv, mentions = BAD_INPUTS[case]
    argv = [a.format(bad=bad_files, npz=checkpoints["npz"]) for a in argv]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert mentions in err


def test_download_failure_offline_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(weights, "HF_URL", closed_port_url())
    code, out, err = run_cli(["--model", "gpt2-small", "--data-dir", tmp_path, "--prompt", "x"], capsys)
    assert code == 2 and err.startswith("error: cannot download") and err.count("\n") == 1


def test_bad_vocab_dir_is_one_line(gpt2_vocab_checkpoint, tmp_path, capsys):
    code, _, err = run_cli(["--weights", gpt2_vocab_checkpoint, "--prompt", "x", "--vocab-dir", tmp_path],
                           capsys)
    assert code == 2 and err.startswith("error: ") and "encoder.json" in err and err.count("\n") == 1


def test_subprocess_streams_text_and_fails_without_traceback(checkpoints, tmp_path):
    prompt = "The cat sat."
    ok = subprocess.run([sys.executable, "generate.py", "--weights", str(checkpoints["npz"]),
                         "--prompt", prompt, "--max-new-tokens", str(N_NEW)],
                        cwd=REPO_ROOT, capture_output=True, timeout=120)
    assert ok.returncode == 0 and ok.stderr == b""
    expected = expected_text(checkpoints["model"], get_tokenizer("byte"), prompt)
    assert expected.startswith(" é€🤖")  # 2-, 3- and 4-byte characters, one byte per token
    assert ok.stdout.decode("utf-8") == expected + "\n"
    bad = subprocess.run([sys.executable, "generate.py", "--weights", str(tmp_path / "missing.npz"),
                          "--prompt", "x"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_every_flag_has_help():
    for action in cli.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
