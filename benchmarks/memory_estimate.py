"""The memory estimate against real runs, and which GPT-2 fits where. Prints figures; not a test.

    python benchmarks/memory_estimate.py --estimates-only        # the estimates of every size and method
    python benchmarks/memory_estimate.py                         # and measure the default cases (~40 min)
    python benchmarks/memory_estimate.py --cases gpt2-small/full gpt2-small/lora --json results.json

Each measured case is a real `train.py` run in a fresh process: random weights of a GPT-2 size
(GPTModel(GPTConfig.preset(size)), written once as a .npz into --work), rasbt's instruction data (the
preference data for DPO), batch 8, 4 steps, one evaluation of one batch each at the start, test
responses of 8 new tokens. The process reports
  - its peak resident memory (ru_maxrss, taken when the test responses are done) against the estimate
    the run printed (the pipeline's own, at the data's longest batch) and the same estimate at the
    longest batch its 4 steps drew, and its peak in each phase (VmHWM: before training, training, after);
  - the time of each training step after the first, of an evaluation batch, of the checkpoint's and the
    best weights' writes, and of one batch of test responses of 256 new tokens (after the peak is
    taken), from which it projects the whole reference job: rasbt's 935 training examples, batch 8,
    2 epochs (232 steps), an evaluation of 5 + 5 batches every 5 steps (48, each writing the checkpoint
    and, at most, the best weights), and 110 test responses of up to 256 tokens, each batch as long as
    the first (random weights never stop early: an upper bound).
Cases run one after another, never two at once: a large model's run takes most of a 24 GB machine.
Peak memory does not depend on what else the machine runs; the times do (docs/memory.md says how
busy the machine was). The run folders are deleted after each case, the weights files at the end.
"""
import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZES = ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")
METHODS = ("full", "lora", "dpo", "dpo-lora")
DEFAULT_CASES = ("gpt2-small/full", "gpt2-small/lora", "gpt2-small/dpo", "gpt2-small/dpo-lora",
                 "gpt2-medium/full", "gpt2-medium/lora", "gpt2-large/full", "gpt2-large/lora", "gpt2-xl/lora")
LORA_RANK = 16
STEPS = 4                      # the first is left out of the step time (it allocates Adam's state)
NEW_TOKENS = 8
# The reference job (rasbt's ch. 7 recipe, settings.REFERENCE_RECIPE): 935 training examples, batch 8
JOB_STEPS = 2 * (935 // 8)     # 2 epochs of full batches
JOB_EVALUATIONS = JOB_STEPS // 5 + 2   # every 5 steps, at step 0 and at the end
JOB_EVAL_BATCHES = 10          # 5 training and 5 validation batches
JOB_NEW_TOKENS = 256


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="SIZE/METHOD",
                        help=f"cases to measure, SIZE of {', '.join(SIZES)} and METHOD of "
                             f"{', '.join(METHODS)} (default: {' '.join(DEFAULT_CASES)})")
    parser.add_argument("--estimates-only", action="store_true",
                        help="print the estimates of every size and method, and run nothing")
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared/data/instruction-data.json"))
    parser.add_argument("--preference-data",
                        default=str(REPO_ROOT.parent / "shared/data/instruction-data-with-preference.json"))
    parser.add_argument("--vocab-dir", default=str(REPO_ROOT.parent / "shared/data/gpt2"))
    parser.add_argument("--work", default="/tmp/minigpt-memory-estimate",
                        help="where the random weights and the run folders go (tens of GB for gpt2-xl)")
    parser.add_argument("--keep-weights", action="store_true",
                        help="keep the weights files for another time")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for case in args.cases:
        size, _, method = case.partition("/")
        if size not in SIZES or method not in METHODS:
            parser.error(f"unknown case {case!r}: SIZE/METHOD, SIZE of {', '.join(SIZES)}, METHOD of "
                         f"{', '.join(METHODS)}")
    return args


def run_args(size, method, weights, args, run_dir):
    """train.py's arguments for one case."""
    common = ["--weights", str(weights), "--vocab-dir", args.vocab_dir, "--batch-size", "8",
              "--max-steps", str(STEPS), "--eval-freq", "100", "--eval-iter", "1",
              "--max-new-tokens", str(NEW_TOKENS), "--out-dir", str(run_dir)]
    if method.startswith("dpo"):
        common += ["--method", "dpo", "--data", args.preference_data]
    else:
        common += ["--data", args.data]
    return common + (["--lora-rank", str(LORA_RANK)] if method.endswith("lora") else [])


# ---------------------------------------------------------------------------------------------
# The worker: one run of train.py in this process, its phases timed

def worker(argv):
    """Run train.main(argv), timing its phases; print one JSON line: peak memory, estimates, times."""
    sys.path.insert(0, str(REPO_ROOT))
    import train
    from minigpt import is_grad_enabled, training
    from minigpt.files.checkpoint import BestWeightsFile, CheckpointFile
    from minigpt.pipeline import fit_check, responses, steps, trained_weights
    from minigpt.pipeline.memory_estimate import estimate_memory

    record = {"estimates": [], "step_ends": [], "lengths": [], "eval": [], "writes": [], "responses": None}

    def timed(function, times):
        def run(*a, **k):
            start = time.monotonic()
            result = function(*a, **k)
            times.append(time.monotonic() - start)
            return result
        return run

    def estimate(job):
        result = estimate_memory(job)
        record["estimates"].append((job, result))
        return result
    fit_check.estimate_memory = estimate

    def train_timed(*a, objective=training.lm_loss, **k):
        def objective_seen(model, batch):  # the lengths of the training batches (evaluations: no grad)
            if is_grad_enabled():
                record["lengths"].append(batch.inputs.shape[1])
            return objective(model, batch)
        record["phase_peaks"] = {"before training": peak_since_last()}
        state = train_loop(*a, objective=objective_seen, **k,
                           on_step=lambda state: record["step_ends"].append(time.monotonic()))
        record["phase_peaks"]["training"] = peak_since_last()
        return state
    train_loop = training.train
    training.train = train_timed
    training.evaluate_model = timed(training.evaluate_model, record["eval"])
    for keeper in (CheckpointFile, BestWeightsFile, trained_weights.BestAdapters):
        keeper.save = timed(keeper.save, record["writes"])

    def answer_timed(model, tokenizer, entries, style, max_new_tokens, *a, **k):
        result = answer(model, tokenizer, entries, style, max_new_tokens, *a, **k)
        # The run's peak is taken here; then the reference job's responses: one batch of 256 new tokens
        record["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        record["phase_peaks"]["after training"] = peak_since_last()
        prompts = [responses.prompt_ids(tokenizer, entry, style) for entry in entries]
        batches = responses.response_batches(model.cfg, prompts, JOB_NEW_TOKENS)
        start = time.monotonic()
        first_batch = [entries[i] for i in batches[0]]
        responses.generate_responses(model, tokenizer, first_batch, style, JOB_NEW_TOKENS, progress=False)
        record["responses"] = dict(batch_seconds=time.monotonic() - start, batches=len(batches),
                                   rows=len(batches[0]))
        return result
    answer = steps.answer_test_set
    steps.answer_test_set = answer_timed

    code = train.main(argv)
    job, estimate_at_longest = record["estimates"][0]
    longest_seen = max(record["lengths"], default=job.length)
    ends = record["step_ends"]
    maxrss = record.get("maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # an early stop
    print("RESULT " + json.dumps(dict(
        exit_code=code, maxrss=maxrss,
        estimate=estimate_at_longest.peak, phase=estimate_at_longest.phase, length=job.length,
        estimate_seen=estimate_memory(dataclasses.replace(job, length=longest_seen)).peak,
        length_seen=longest_seen, step_seconds=[b - a for a, b in zip(ends, ends[1:])],
        eval_seconds=record["eval"], write_seconds=record["writes"], responses=record["responses"],
        phase_peaks=record.get("phase_peaks"))))


def peak_since_last():
    """The process's peak resident memory (VmHWM) since the last call, which resets it; None off Linux.
    Memory freed in one phase stays resident in the next (minigpt/cpu/allocator.py), so a phase's peak is
    at least the resident memory it started with."""
    try:
        peak = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM:"))
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, StopIteration):
        return None
    return peak


# ---------------------------------------------------------------------------------------------
# The parent: weights, cases, the table

def ensure_weights(size, work):
    """work/<size>.npz: random weights of that size, made once in a process of its own."""
    path = Path(work) / f"{size}.npz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        code = (f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); "
                f"from minigpt import GPTConfig, GPTModel; from minigpt.files.weights import save_npz; "
                f"save_npz(GPTModel(GPTConfig.preset({size!r}), seed=0), {str(path)!r})")
        print(f"writing random {size} weights to {path}", file=sys.stderr)
        subprocess.run([sys.executable, "-c", code], check=True)
    return path


def measure(case, args):
    size, _, method = case.partition("/")
    run_dir = Path(args.work) / case.replace("/", "-")
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = run_args(size, method, ensure_weights(size, args.work), args, run_dir)
    print(f"{case}: python train.py {' '.join(argv)}", file=sys.stderr)
    start = time.monotonic()
    result = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True, text=True,
                            cwd=REPO_ROOT)
    shutil.rmtree(run_dir, ignore_errors=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return dict(case=case, error=(result.stderr.strip().splitlines() or ["no output"])[-1])
    measured = json.loads(lines[-1][len("RESULT "):])
    measured.update(case=case, wall_seconds=time.monotonic() - start,
                    opening=[line for line in result.stdout.splitlines()[:2]])
    if measured["exit_code"]:
        measured["error"] = (result.stderr.strip().splitlines() or ["?"])[-1]
    return measured


def projected_job_seconds(measured):
    """The reference job's time from one case's figures (the module docstring)."""
    mean = lambda values: sum(values) / len(values) if values else 0.0  # noqa: E731
    step = mean(measured["step_seconds"])
    eval_batch = mean(measured["eval_seconds"]) / 2               # one training and one validation batch
    writes = sum(measured["write_seconds"])                      # a checkpoint and the best weights, once
    replies = measured["responses"]  # the first batch's time, for each (their prompts are the shortest)
    return dict(step=step, training=JOB_STEPS * step,
                evaluations=JOB_EVALUATIONS * (JOB_EVAL_BATCHES * eval_batch + writes),
                responses=replies["batches"] * replies["batch_seconds"])


def print_estimates(args):
    """Every size and method at the reference job's longest batch, estimated without running anything."""
    sys.path.insert(0, str(REPO_ROOT))
    from minigpt import GPTConfig
    from minigpt.data import InstructionDataset, load_instruction_data, split_data
    from minigpt.pipeline.memory_estimate import Job, estimate_memory, sequence_sizes
    from minigpt.tokenizer import get_tokenizer
    tokenizer = get_tokenizer("gpt2", args.vocab_dir)
    dataset = InstructionDataset(split_data(load_instruction_data(args.data))[0], tokenizer, "alpaca")
    sizes = sequence_sizes(dataset.token_ids, dataset.prompt_lengths, False, 1024)
    print(f"estimated peak memory, rasbt's job (batch 8, longest batch {sizes['length']} positions, "
          f"256 new tokens):")
    print(f"| {'model':<12} | {'full fine-tuning':<34} | {'LoRA, rank 16':<34} |")
    print(f"|{'-' * 14}|{'-' * 36}|{'-' * 36}|")
    for size in SIZES:
        cells = []
        for lora_rank in (None, LORA_RANK):
            job = Job(GPTConfig.preset(size), 8, lora_rank=lora_rank, max_new_tokens=JOB_NEW_TOKENS, **sizes)
            estimate = estimate_memory(job)
            cells.append(f"{estimate.peak / 1e9:5.1f} GB ({estimate.phase})")
        print(f"| {size:<12} | {cells[0]:<34} | {cells[1]:<34} |")


def main(argv=None):
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    print_estimates(args)
    if args.estimates_only:
        return 0
    print(f"\nmeasured, one case at a time (load average {os.getloadavg()[0]:.1f} at the start):")
    results = []
    print("| case | estimate (phase) | at the batches drawn | peak RSS | error | step | reference job |")
    print("|---|---|---|---|---|---|---|")
    for case in args.cases:
        measured = measure(case, args)
        results.append(measured)
        if "error" in measured:
            print(f"| {case} | {measured['error']} |", flush=True)
            continue
        job = projected_job_seconds(measured)
        measured["projected"] = job
        total = job["training"] + job["evaluations"] + job["responses"]
        error = measured["maxrss"] / measured["estimate_seen"] - 1
        projection = ("(DPO: another job)" if "dpo" in case else
                      f"{total / 60:.0f} min (training {job['training'] / 60:.0f}, evaluations "
                      f"{job['evaluations'] / 60:.0f}, responses {job['responses'] / 60:.0f})")
        print(f"| {case} | {measured['estimate'] / 1e9:.2f} GB ({measured['phase']}, {measured['length']} "
              f"positions) | {measured['estimate_seen'] / 1e9:.2f} GB ({measured['length_seen']}) | "
              f"{measured['maxrss'] / 1e9:.2f} GB | {error:+.0%} | {job['step']:.1f} s | {projection} |",
              flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if not args.keep_weights:
        for size in SIZES:
            (Path(args.work) / f"{size}.npz").unlink(missing_ok=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any("error" in result for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
