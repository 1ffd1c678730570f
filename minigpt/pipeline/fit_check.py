"""Will the run fit? Its memory and disk, estimated before the model is loaded, against the machine's.

    check_fit(job, "full fine-tuning of gpt2-xl", run_dir, model_name, data_dir, resume, fit_check, log)

prints two of a run's opening lines,

    memory: about 30.9 GB at peak, in a training step (weights 6.2 GB, gradients 6.2 GB, Adam 12.5 GB,
            activations 5.9 GB for 8 x 91 positions); 24.7 GB available (MemAvailable)
    disk: about 56.1 GB at most in runs/NAME (checkpoint.npz 18.7 GB, ...), 80.2 GB free

and, unless `fit_check` is off (--no-fit-check), stops the run with one line (a ValueError: train.py's
"error:", exit code 2) when either cannot fit, naming what would:

    full fine-tuning of gpt2-xl needs about 30.9 GB of memory, with 24.7 GB available (MemAvailable);
    --lora-rank 16 needs about 13.0 GB (--no-fit-check starts the run anyway)

The memory estimate is pipeline/memory_estimate.py's; what the machine has is pipeline/machine.py's.
On disk a run writes (pipeline/trained_weights.py, minigpt/files/checkpoint.py):

    checkpoint.npz      every weight (a LoRA run's frozen base too) and Adam's m and v: exact resume
                        needs no other file; rewritten at every evaluation beside the old one, which it
                        then replaces (atomic), so twice its size for a moment
    model-best.npz      the weights of the lowest validation loss (a LoRA run keeps adapters-best.npz
                        during training and writes the merged model-best.npz at the end)
    model-final.npz     the weights at the end, a plain GPT-2 for generate.py (LoRA: merged)
    adapters-*.npz      LoRA's A and B alone
    model-*-hf/         --export-hf: the final and the best weights again, in Hugging Face's layout
and --model downloads GPT-2 once into --data-dir (model.safetensors) and converts it (NAME.npz).
"""
import dataclasses
from pathlib import Path

from . import machine
from ..files.fileio import format_bytes
from .memory_estimate import describe, estimate_memory, lora_parameter_count, parameter_count
from .steps import CHECKPOINT_NAME
from .trained_weights import ADAPTERS_BEST, ADAPTERS_FINAL, MODEL_BEST, MODEL_FINAL

BYTES = 4                          # float32
SMALL_FILES_BYTES = 10 * 10**6     # config.json, history.json, metrics.json, the responses, the plot
SUGGESTED_LORA_RANK = 16           # the reference's exercise rank
HF_EXPORTS = ("model-final-hf", "model-best-hf")


def run_name(method, lora_rank, source):
    """How the messages name a run: "full fine-tuning of gpt2-xl", "LoRA fine-tuning (rank 16) of x.npz",
    "DPO of x.npz", "DPO with LoRA (rank 8) of x.npz" (source None: a new model)."""
    source = source or "a new model"
    if method == "fine-tuning":
        return (f"LoRA fine-tuning (rank {lora_rank}) of {source}" if lora_rank
                else f"full fine-tuning of {source}")
    return f"{method} with LoRA (rank {lora_rank}) of {source}" if lora_rank else f"{method} of {source}"


def check_fit(job, what, run_dir, model_name, data_dir, resume, fit_check=True, log=print):
    """Print the memory and disk lines of a run (what: "full fine-tuning of gpt2-xl", for the messages);
    raise ValueError with one line when either cannot fit, unless fit_check is off (then only warn).
    Returns the advice for memory running out anyway: the estimate, and what_fits in less."""
    estimate = estimate_memory(job)
    available = machine.available_memory()
    memory_line = f"memory: {describe(estimate, job)}"
    problems = []
    if available is None:
        log(f"{memory_line}; the memory available is unknown here")
    else:
        room, source = available
        log(f"{memory_line}; {format_bytes(room)} available ({source})")
        if estimate.peak > room:
            problems.append(f"{what} needs about {format_bytes(estimate.peak)} of memory, with "
                            f"{format_bytes(room)} available ({source}); {what_fits(job, room)}")
    needs = disk_needs(job.cfg, job.lora_rank, job.export_hf, run_dir, model_name, data_dir, resume)
    log("disk: " + "; ".join(f"about {format_bytes(need)} at most in {folder} ({detail}), "
                             f"{format_bytes(free)} free" for folder, need, free, detail in needs))
    problems += [f"{what} needs about {format_bytes(need)} of disk in {folder} ({detail}), with "
                 f"{format_bytes(free)} free there; make room or choose another folder"
                 for folder, need, free, detail in needs if need > free]
    if problems and fit_check:
        raise ValueError(f"{'; '.join(problems)} (--no-fit-check starts the run anyway)")
    for problem in problems:
        log(f"warning: {problem}; going ahead (--no-fit-check)")
    if available is None:
        return what_fits(job, estimate.peak)
    return (f"the run was estimated at {format_bytes(estimate.peak)} with {format_bytes(available[0])} "
            f"available; {what_fits(job, min(available[0], estimate.peak))}")


def what_fits(job, room):
    """'--lora-rank 16 needs about 12.8 GB': the first change that needs less than `room` bytes, trying LoRA
    (from full fine-tuning), then halving the batch size, with and without LoRA; else the least any needs."""
    options = [{"lora_rank": SUGGESTED_LORA_RANK}] if not job.lora_rank else []
    batch_size = job.batch_size // 2
    while batch_size >= 1:
        options.append({"batch_size": batch_size})
        if not job.lora_rank:
            options.append({"lora_rank": SUGGESTED_LORA_RANK, "batch_size": batch_size})
        batch_size //= 2
    peak = None
    for option in options:
        peak = estimate_memory(dataclasses.replace(job, **option)).peak
        flags = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in option.items())
        if peak < room:
            return f"{flags} needs about {format_bytes(peak)}"
    if peak is None:
        return "it is LoRA with --batch-size 1 already: a smaller model would fit, or more memory"
    return f"even {flags} needs about {format_bytes(peak)}"


def disk_needs(cfg, lora_rank, export_hf, run_dir, model_name, data_dir, resume):
    """[(folder, bytes it needs at most, free bytes, what they are)]: the run folder's files (less those
    already there, which the run replaces) and, for --model's first use, its download and conversion.
    Folders on one filesystem share its free bytes, so their needs are added up."""
    files = run_files(cfg, lora_rank, export_hf)
    checkpoint = files[CHECKPOINT_NAME]
    written = sum(files.values())
    # At most: a checkpoint being replaced beside the old one, or everything once training is done.
    peak = max(written, 2 * checkpoint + files[MODEL_BEST if not lora_rank else ADAPTERS_BEST])
    held = sum(_size(Path(run_dir) / name) for name in files)
    detail = ", ".join(f"{name} {format_bytes(size)}" for name, size in files.items() if size >= 10**8)
    needs = [(Path(run_dir), peak - held, detail or "small files")]
    if model_name is not None and not resume and not (Path(data_dir) / f"{model_name}.npz").is_file():
        weights = BYTES * parameter_count(cfg)
        needs.append((Path(data_dir), 2 * weights, f"{model_name}'s download and conversion, once"))
    by_filesystem = {}
    for folder, need, what in needs:
        device = machine.filesystem(folder)
        first = by_filesystem.get(device)
        by_filesystem[device] = ((folder, need, what) if first is None else
                                 (first[0], first[1] + need, f"{first[2]}; {what} in {folder}"))
    return [(folder, need, machine.free_disk(folder), what) for folder, need, what in by_filesystem.values()]


def run_files(cfg, lora_rank, export_hf):
    """{name: bytes} of the files a run leaves in its folder (the module docstring says why each is there)."""
    weights = BYTES * parameter_count(cfg)
    adapters = BYTES * lora_parameter_count(cfg, lora_rank) if lora_rank else 0
    trained = adapters or weights
    files = {CHECKPOINT_NAME: weights + adapters + 2 * trained, MODEL_BEST: weights, MODEL_FINAL: weights}
    if lora_rank:
        files.update({ADAPTERS_BEST: adapters, ADAPTERS_FINAL: adapters})
    if export_hf:
        files.update({folder + "/": weights for folder in HF_EXPORTS})
    files["other files"] = SMALL_FILES_BYTES
    return files


def _size(path):
    """Bytes in a file or a folder's files; 0 if it does not exist."""
    if path.is_file():
        return path.stat().st_size
    return sum(child.stat().st_size for child in path.rglob("*") if child.is_file()) if path.is_dir() else 0
