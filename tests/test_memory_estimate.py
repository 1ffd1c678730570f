"""The memory and disk estimates, what the machine has, and the check that stops a run that cannot fit.

The estimate's accuracy on GPT-2's sizes is measured, not asserted: benchmarks/memory_estimate.py,
docs/memory.md. Here: its arithmetic by hand on a tiny model, its activations against tracemalloc on
small ones, its order (more rows, longer sequences, bigger models need more; LoRA less), the machine's
files read by a fake /proc and cgroup, and train.py's opening lines and refusals.
"""
import dataclasses
import os
import tracemalloc

import numpy as np
import pytest

import train
from minigpt import GPTConfig, GPTModel
from minigpt.lora import apply_lora
from minigpt.pipeline import fit_check, machine
from minigpt.pipeline.memory_estimate import (BASELINE_BYTES, TRANSIENT_PER_POSITION, Job, activation_numbers,
                                              estimate_memory, lora_parameter_count, parameter_count,
                                              sequence_sizes)
from test_train_cli import TINY

GiB = 1 << 30


def test_the_estimate_of_a_tiny_model_by_hand():
    cfg = GPTConfig(vocab_size=10, context_length=8, emb_dim=4, n_heads=2, n_layers=1)
    # wte 10x4, wpe 8x4; a block: ln_1 2x4, c_attn 4x12 + 12, c_proj 4x4 + 4, ln_2 2x4, c_fc 4x16 + 16,
    # mlp.c_proj 16x4 + 4; ln_f 2x4
    assert parameter_count(cfg) == 40 + 32 + (8 + 60 + 20 + 8 + 80 + 68) + 8 == 324
    assert lora_parameter_count(cfg, rank=2) == 2 * ((4 + 12) + (4 + 4) + (4 + 16) + (16 + 4)) == 128
    kept, cached, loss = activation_numbers(cfg, rows=2, length=3)
    positions = 2 * 3
    # Outputs: wte's rows, their sum with wpe's, ln_f (4 each a position), wpe's rows (3 x 4 once), and in
    # the block ln_1 4, c_attn 12, attention 4, c_proj 4, residual 4, ln_2 4, c_fc 16, GELU 16, c_proj 4,
    # residual 4 (72 = 18 C)
    assert kept == positions * (3 * 4 + 72) + 3 * 4 == 516
    # Caches: two xhat (8) and rstd (2), GELU's tanh (16), attention weights (2 heads x 3 keys); ln_f's
    # xhat (4) and rstd (1)
    assert cached == positions * (8 + 2 + 16 + 6 + 4 + 1) == 222
    assert loss == positions * (10 + 4)                           # each target's logits and dx
    assert activation_numbers(cfg, rows=2, length=3, targets=1)[2] == 2 * (10 + 4)
    estimate = estimate_memory(Job(cfg, batch_size=2, length=3))
    transient = 8 * 4 * positions                                 # GELU's backward, 8 C a position
    assert estimate.activations == 4 * (516 + 222 + 84 + transient)
    assert (estimate.weights, estimate.gradients, estimate.adam) == (4 * 324, 4 * 324, 8 * 324)
    assert estimate.step == BASELINE_BYTES + 4 * (4 * 324 + 516 + 222 + 84 + transient)


def test_sequence_sizes_count_the_targets_collate_keeps():
    sequences, prompts = [[1] * 10, [1] * 6], [7, 2]              # prompt (header included) + response
    unmasked = sequence_sizes(sequences, prompts, mask_prompt=False, cut=8)
    assert unmasked == dict(length=8, targets=8, prompt_length=7)
    # masked: the response, and <|endoftext|> (the target of the last token): 10 - 7 + 1 and 6 - 2 + 1
    assert sequence_sizes(sequences, prompts, mask_prompt=True, cut=100)["targets"] == 5
    assert sequence_sizes(sequences, prompts, mask_prompt=True, cut=8)["targets"] == 5  # the first cut to 2


@pytest.mark.parametrize("lora_rank, dropout", [(None, False), (None, True), (4, False)])
def test_the_activations_match_what_a_step_allocates(lora_rank, dropout):
    """What one forward and backward pass allocate at their live peak (tracemalloc sees NumPy's arrays) is
    the larger end of the backward pass, as the estimate's module docstring counts them, within 10%.
    (A first step also starts the thread pool: warm up.)"""
    cfg = GPTConfig(vocab_size=500, context_length=32, emb_dim=64, n_heads=4, n_layers=2,
                    drop_rate=0.1 if dropout else 0.0)
    rows, length = 4, 24
    model = GPTModel(cfg, seed=0)
    if lora_rank:
        apply_lora(model, lora_rank, lora_rank)
    rng = np.random.default_rng(0)
    inputs, targets = (rng.integers(0, cfg.vocab_size, (rows, length)) for _ in range(2))
    model.loss(inputs, targets).backward()
    model.zero_grad()
    tracemalloc.start()
    try:
        model.loss(inputs, targets).backward()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    kept, cached, loss = activation_numbers(cfg, rows, length, lora_rank, dropout)
    trained = lora_parameter_count(cfg, lora_rank) if lora_rank else parameter_count(cfg)
    head_gradient = 0 if lora_rank else cfg.vocab_size * cfg.emb_dim  # wte's, made first
    at_start, at_end = kept + cached + loss + head_gradient, kept + trained
    transient = TRANSIENT_PER_POSITION * cfg.emb_dim * rows * length
    assert 4 * (max(at_start, at_end) + transient) == pytest.approx(peak, rel=0.1)


def test_more_rows_longer_sequences_bigger_models_need_more_and_lora_less():
    small, medium = GPTConfig.preset("gpt2-small"), GPTConfig.preset("gpt2-medium")
    job = Job(small, batch_size=8, length=92, max_new_tokens=256)
    peak = estimate_memory(job).peak
    assert estimate_memory(dataclasses.replace(job, targets=30)).step < estimate_memory(job).step
    for bigger in (dataclasses.replace(job, batch_size=16), dataclasses.replace(job, length=184),
                   dataclasses.replace(job, cfg=medium), dataclasses.replace(job, sequences_per_example=2),
                   dataclasses.replace(job, dropout=True)):
        assert estimate_memory(bigger).step > estimate_memory(job).step
    assert estimate_memory(dataclasses.replace(job, export_hf=True)).peak > peak
    lora = estimate_memory(dataclasses.replace(job, lora_rank=16))
    assert lora.peak < peak and lora.adam < estimate_memory(job).adam / 50
    assert estimate_memory(dataclasses.replace(job, lora_rank=64)).peak > lora.peak


def test_what_fits_suggests_lora_then_smaller_batches():
    xl = Job(GPTConfig.preset("gpt2-xl"), batch_size=8, length=92)
    assert estimate_memory(xl).peak > 24e9
    assert fit_check.what_fits(xl, 22e9).startswith("--lora-rank 16 needs about ")
    long_lora = dataclasses.replace(xl, lora_rank=16, length=1024)  # its training step is its peak
    advice = fit_check.what_fits(long_lora, estimate_memory(long_lora).peak)
    assert advice.startswith("--batch-size 4 needs about ")
    lora = dataclasses.replace(xl, lora_rank=16)
    assert fit_check.what_fits(xl, 1e9).startswith("even --lora-rank 16 --batch-size 1 needs about ")
    smallest = dataclasses.replace(lora, batch_size=1)
    assert "LoRA with --batch-size 1 already" in fit_check.what_fits(smallest, 1e9)


# ---------------------------------------------------------------------------------------------
# What the machine has

def fake_machine(tmp_path, meminfo_kb=8 << 20, rss_kb=1 << 20, cgroup=None, cgroup_v1=False):
    """A /proc and a cgroup tree: MemAvailable, the process's VmRSS, and a memory.max / current if given."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:       {2 * meminfo_kb} kB\nMemAvailable:   {meminfo_kb} kB\n")
    (proc / "self" / "status").write_text(f"Name:\tpython\nVmSize:\t{4 * rss_kb} kB\nVmRSS:\t{rss_kb} kB\n")
    root = tmp_path / "cgroup"
    if cgroup_v1:
        (proc / "self" / "cgroup").write_text("5:cpu,cpuacct:/x\n4:memory:/job\n")
        names, folder = ("memory.limit_in_bytes", "memory.usage_in_bytes"), root / "memory" / "job"
    else:
        (proc / "self" / "cgroup").write_text("0::/job\n")
        names, folder = ("memory.max", "memory.current"), root / "job"
    folder.mkdir(parents=True)
    if cgroup is not None:
        limit, usage = cgroup
        (folder / names[0]).write_text(f"{limit}\n")
        (folder / names[1]).write_text(f"{usage}\n")
    return proc, root


@pytest.fixture
def no_address_limit(monkeypatch):
    monkeypatch.setattr(machine.resource, "getrlimit", lambda which: (machine.resource.RLIM_INFINITY,) * 2)


def test_available_memory_is_the_least_room_plus_what_the_process_holds(tmp_path, no_address_limit):
    proc, root = fake_machine(tmp_path)
    assert machine.available_memory(proc, root) == (9 * GiB, "MemAvailable")
    proc, root = fake_machine(tmp_path / "limited", cgroup=(4 * GiB, 3 * GiB))
    assert machine.available_memory(proc, root) == (2 * GiB, "the cgroup's limit")
    proc, root = fake_machine(tmp_path / "v1", cgroup=(3 * GiB, 2 * GiB), cgroup_v1=True)
    assert machine.available_memory(proc, root) == (2 * GiB, "the cgroup's limit")
    proc, root = fake_machine(tmp_path / "unlimited", cgroup=("max", GiB))
    assert machine.available_memory(proc, root) == (9 * GiB, "MemAvailable")
    assert machine.available_memory(tmp_path / "nothing", tmp_path / "nothing") is None


def test_an_address_space_limit_counts(tmp_path, monkeypatch):
    proc, root = fake_machine(tmp_path)                           # VmSize 4 GiB, VmRSS 1 GiB
    monkeypatch.setattr(machine.resource, "getrlimit",
                        lambda which: (6 * GiB, machine.resource.RLIM_INFINITY))
    assert machine.available_memory(proc, root) == (3 * GiB, "ulimit -v")


# ---------------------------------------------------------------------------------------------
# Disk

def test_the_run_files_and_the_disk_a_run_needs(tmp_path):
    cfg = GPTConfig.preset("gpt2-small")
    weights, adapters = 4 * parameter_count(cfg), 4 * lora_parameter_count(cfg, 16)
    full = fit_check.run_files(cfg, None, export_hf=True)
    assert full["checkpoint.npz"] == 3 * weights                  # the weights and Adam's m and v
    assert full["model-best.npz"] == full["model-final.npz"] == full["model-final-hf/"] == weights
    lora = fit_check.run_files(cfg, 16, export_hf=False)
    assert lora["checkpoint.npz"] == weights + 3 * adapters       # the frozen base too
    assert lora["adapters-final.npz"] == adapters and "model-best-hf/" not in lora

    (folder,) = fit_check.disk_needs(cfg, None, False, tmp_path / "run", None, tmp_path / "data", False)
    assert folder[0] == tmp_path / "run" and folder[2] == machine.free_disk(tmp_path)
    # a checkpoint replaced beside the old one, and the best weights: 2 x 3 + 1 weights
    assert folder[1] == 7 * weights and "checkpoint.npz 1.5 GB" in folder[3]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.npz").write_bytes(b"x" * 1000)  # a resumed run's files are replaced
    (with_download,) = fit_check.disk_needs(cfg, None, False, tmp_path / "run", "gpt2-small",
                                            tmp_path / "data", False)
    assert with_download[1] == 7 * weights - 1000 + 2 * weights     # same filesystem: the download adds up
    assert with_download[0] == tmp_path / "run"
    assert with_download[3].endswith(f"; gpt2-small's download and conversion, once in {tmp_path / 'data'}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "gpt2-small.npz").write_bytes(b"")          # converted already: nothing to fetch
    assert fit_check.disk_needs(cfg, None, False, tmp_path / "run", "gpt2-small", tmp_path / "data",
                                False)[0][1] == 7 * weights - 1000


# ---------------------------------------------------------------------------------------------
# In a run

def test_a_run_opens_with_its_memory_and_disk(tmp_path, capsys):
    assert train.main(TINY + ["--max-steps", "1", "--out-dir", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("memory: about ") and " at peak, " in lines[0] and " available (" in lines[0]
    assert lines[1].startswith("disk: about ") and f"in {tmp_path / 'run'}" in lines[1] and "free" in lines[1]


@pytest.mark.parametrize("short_of", ["memory", "disk"])
def test_a_run_that_cannot_fit_stops_before_loading_unless_told(tmp_path, capsys, monkeypatch, short_of):
    if short_of == "memory":
        monkeypatch.setattr(machine, "available_memory", lambda: (10**6, "MemAvailable"))
    else:
        monkeypatch.setattr(machine, "free_disk", lambda path: 1000)
    loaded, init = [], GPTModel.__init__
    monkeypatch.setattr(GPTModel, "__init__", lambda self, *a, **k: loaded.append(1) or init(self, *a, **k))
    run_dir = tmp_path / "run"
    assert train.main(TINY + ["--max-steps", "1", "--out-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: full fine-tuning of a new model needs about ") and err.count("\n") == 1
    assert f"of {short_of}" in err and "(--no-fit-check starts the run anyway)" in err
    if short_of == "memory":
        assert "1.0 MB available (MemAvailable); even --lora-rank 16 --batch-size 1 needs about" in err
    assert not loaded and not run_dir.exists()
    assert train.main(TINY + ["--max-steps", "1", "--out-dir", str(run_dir), "--no-fit-check"]) == 0
    out = capsys.readouterr().out
    assert "warning: full fine-tuning of a new model needs about" in out and "going ahead" in out
    assert loaded


def test_a_resumed_run_may_turn_the_check_off(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    assert train.main(TINY + ["--max-steps", "2", "--out-dir", str(run_dir)]) == 0
    monkeypatch.setattr(machine, "available_memory", lambda: (10**6, "the cgroup's limit"))
    assert train.main(["--resume", str(run_dir), "--max-steps", "3"]) == 2
    assert "with 1.0 MB available (the cgroup's limit)" in capsys.readouterr().err
    assert train.main(["--resume", str(run_dir), "--max-steps", "3", "--no-fit-check"]) == 0
    assert os.path.isfile(run_dir / "metrics.json")
