"""Speed and memory of minigpt against the same work in PyTorch, on the CPU. Prints figures; not a test.

    python benchmarks/bench.py                      # every row, minigpt and PyTorch (if installed)
    python benchmarks/bench.py --quick              # byte model + gpt2-small 8x128, 1 run (smoke test)
    python benchmarks/bench.py --only train-gpt2-8x128 --framework minigpt --json out.json

Each (row, framework) runs in a fresh subprocess of this script (`--worker`), which times the work and
reports its own peak resident memory (ru_maxrss) as one JSON line, so a row's memory is not inflated
by the rows before it. The driver fixes the thread count for both sides (OMP_NUM_THREADS and friends
for NumPy's BLAS, torch.set_num_threads for PyTorch), collects the lines and prints the table.

Rows (targets are minigpt/PyTorch ratios from the issue):
    train-*     forward + backward + AdamW(lr 5e-5, wd 0.1), random batch, ~40% of targets ignored (-100)
    eval-*      forward + loss under no_grad, the same batch
    generate-*  greedy decoding, 100-token prompt, 100 new tokens, batch 1: tokens/s (prefill included);
                PyTorch side: transformers' GPT2LMHeadModel(GPT2Config()).generate
    chat-turn   a chat's 5th turn (4 exchanges of a 60-token message and a 100-token reply before it): the
                time to its first token with the KV cache kept across turns and with the history recomputed,
                and its reply's tokens/s over the ~700-token history; minigpt only
    train-*-lora  the same step training only LoRA adapters (rank 16, alpha 16, the four block linears);
                PyTorch side: torch_gpt2's LoRA option (frozen nn.Linear + lora_A/lora_B Parameters)
    epoch-*     one epoch of the fine-tuning job (935 Alpaca examples, GPT-2 tokenizer, batch 8, the real
                DataLoader), projected from a few timed steps; PyTorch side: the reference pipeline
                (no length grouping, no prompt masking, full head, F.cross_entropy, torch AdamW)
The PyTorch model is benchmarks/torch_gpt2.py: plain eager GPT-2 with F.scaled_dot_product_attention.
Both sides start from random weights: speed does not depend on the values.

NumPy is imported inside functions, not at the top: BLAS reads its thread count once, when NumPy
loads, so a worker sets the count first.
"""
import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
RESULT_PREFIX = "BENCH_RESULT "    # a worker's one line of JSON on stdout starts with this
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
LR, WEIGHT_DECAY = 5e-5, 0.1       # the fine-tuning job's AdamW
LORA_RANK, LORA_ALPHA = 16, 16     # the reference's LoRA (ch. 7 exercise 7.4, appendix E)
IGNORED_FRACTION = 0.4             # share of synthetic targets set to -100
EPOCH_BATCH_SIZE = 8
MODELS = {
    "gpt2-small": dict(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12),
    "byte": dict(vocab_size=257, context_length=256, emb_dim=256, n_heads=4, n_layers=4),
    # python train.py's
    "default": dict(vocab_size=257, context_length=64, emb_dim=128, n_heads=4, n_layers=4),
}
RESPONSE_TOKENS = 32               # new tokens per test-set response (random weights: no early stop)
CHAT_TURNS, CHAT_MESSAGE_TOKENS, CHAT_REPLY_TOKENS = 5, 60, 100   # chat-turn: its 5th turn's first token


@dataclass(frozen=True)
class Row:
    kind: str                # "train" | "eval" | "tasks" | "generate" | "chat" | "responses" | "epoch"
    model: str               # key of MODELS
    target: tuple = None     # (op, x): minigpt/PyTorch should be op x; None: no target
    batch: int = 8
    seq_len: int = 128       # T of the synthetic batch; the prompt length for generation
    use_cache: bool = True
    mask_prompt: bool = False
    group_by_length: bool = False
    lora: bool = False       # train LoRA adapters only (LORA_RANK, LORA_ALPHA)
    repeats: int = 3         # timed runs by default (after the warm-up)
    warmup: int = 1          # untimed runs first; the small models' first steps are slower on both sides


ROWS = {
    "train-default-64x64": Row("train", "default", ("<=", 0.9), batch=64, seq_len=64, repeats=30, warmup=5),
    "train-default-tasks": Row("tasks", "default", ("<=", 0.9), batch=64, repeats=40, warmup=5),
    "train-byte-8x128": Row("train", "byte", ("<=", 0.9), repeats=30, warmup=5),
    "train-gpt2-8x128": Row("train", "gpt2-small", ("<=", 0.65)),
    "train-gpt2-8x256": Row("train", "gpt2-small", ("<=", 0.65), seq_len=256),
    "train-gpt2-8x128-lora": Row("train", "gpt2-small", ("<=", 0.65), lora=True),
    "eval-byte-8x128": Row("eval", "byte", ("<=", 0.7), repeats=30, warmup=5),
    "eval-gpt2-8x128": Row("eval", "gpt2-small", ("<=", 0.7)),
    "eval-gpt2-8x256": Row("eval", "gpt2-small", ("<=", 0.7), seq_len=256),
    "generate-cached": Row("generate", "gpt2-small", (">=", 1.0), batch=1, seq_len=100),
    "generate-uncached": Row("generate", "gpt2-small", None, batch=1, seq_len=100, use_cache=False),
    "chat-turn": Row("chat", "gpt2-small", None, batch=1, seq_len=CHAT_MESSAGE_TOKENS),
    "responses-ragged": Row("responses", "gpt2-small", (">=", 1.0), repeats=1),
    "epoch-plain": Row("epoch", "gpt2-small", ("<=", 0.6)),
    "epoch-mask": Row("epoch", "gpt2-small", ("<=", 0.6), mask_prompt=True),
    "epoch-group": Row("epoch", "gpt2-small", ("<=", 0.6), group_by_length=True),
    "epoch-mask-group": Row("epoch", "gpt2-small", ("<=", 0.6), mask_prompt=True, group_by_length=True),
}
QUICK_ROWS = ("train-default-64x64", "train-byte-8x128", "eval-byte-8x128", "train-gpt2-8x128",
              "eval-gpt2-8x128")
BUSY_ROWS = ("train-byte-8x128", "train-gpt2-8x128", "train-default-64x64")   # --busy without --only
# a busy neighbour may slow minigpt by at most this, and not more than PyTorch
BUSY_TARGET = 3.0
# The neighbours of --busy: a NumPy program multiplying matrices on all cores, or one busy Python loop.
BUSY_PROGRAMS = {
    "blas": "import numpy as np\na = np.random.rand(1024, 1024)\nwhile True:\n    a @ a",
    "spin": "while True:\n    pass",
}
REFERENCE_EPOCH_ROW = "epoch-plain"  # the PyTorch side of every epoch row: the same batches as this one
MEMORY_TARGET = ("<=", 1.0)
LORA_FULL_ROW = "train-gpt2-8x128"   # a LoRA row is also compared with this row's minigpt step ...
LORA_VS_FULL_TARGET = ("<=", 0.7)   # ... and must take at most 0.7x its time (and less memory)
CACHE_SPEEDUP_TARGET = (">=", 4.0)   # minigpt cached tokens/s over minigpt uncached


# ---------------------------------------------------------------------------------------------
# The two sides: the same calls on minigpt and on PyTorch

class MinigptSide:
    def __init__(self, args):
        import minigpt
        self.minigpt = minigpt

    def build(self, model_name, train, lora=False):
        self.model = self.minigpt.GPTModel(self.minigpt.GPTConfig(**MODELS[model_name]), seed=0)
        if lora:
            import numpy as np
            from minigpt.lora import apply_lora
            apply_lora(self.model, LORA_RANK, LORA_ALPHA, rng=np.random.default_rng(0))
        if train:  # AdamW's moments take 2x the parameters' memory: not for the evaluation rows
            self.optimizer = self.minigpt.optim.AdamW(self.model.parameters(trainable_only=True), lr=LR,
                                                      weight_decay=WEIGHT_DECAY)

    def train_step(self, inputs, targets, full_head=False):
        """full_head is PyTorch's option; minigpt's loss always runs the head on kept targets only."""
        self.optimizer.zero_grad()
        loss = self.model.loss(inputs, targets)
        loss.backward()
        self.optimizer.step()
        return float(loss.data)

    def eval_loss(self, inputs, targets):
        with self.minigpt.no_grad():
            return float(self.model.loss(inputs, targets).data)

    def build_generator(self):
        self.build("gpt2-small", train=False)

    def generate(self, prompt, new_tokens, use_cache):
        out = self.minigpt.generate(self.model, prompt, new_tokens, use_cache=use_cache)
        assert out.shape == (prompt.shape[0], prompt.shape[1] + new_tokens), out.shape

    def respond(self, batches, new_tokens):
        """Greedy continuations of each batch of prompts (lists of ids), decoded together as minigpt's
        test-set responses are (responses.generate_responses)."""
        for prompts in batches:
            outputs = self.minigpt.generate(self.model, prompts, new_tokens)
            assert all(len(out) == len(p) + new_tokens for out, p in zip(outputs, prompts))

    def info(self):
        return {"blas_threads": blas_threads()}


class TorchSide:
    def __init__(self, args):
        import torch
        self.torch = torch
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        self.head = args.torch_head
        self.extra = {}

    def build(self, model_name, train, lora=False):
        from torch_gpt2 import TorchGPT2
        self.model = TorchGPT2(**MODELS[model_name], **(dict(lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA)
                                                        if lora else {}))
        if train:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = self.torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)

    def train_step(self, inputs, targets, full_head=False):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model.loss(self.torch.from_numpy(inputs), self.torch.from_numpy(targets),
                               head="full" if full_head else self.head)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def eval_loss(self, inputs, targets):
        with self.torch.no_grad():
            return self.model.loss(self.torch.from_numpy(inputs), self.torch.from_numpy(targets),
                                   head=self.head).item()

    def build_generator(self):
        from transformers import GPT2Config, GPT2LMHeadModel
        self.model = GPT2LMHeadModel(GPT2Config()).eval()          # GPT-2 small, random weights
        self.extra["attn_implementation"] = getattr(self.model.config, "_attn_implementation", None)

    def generate(self, prompt, new_tokens, use_cache):
        ids = self.torch.from_numpy(prompt)
        out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  use_cache=use_cache, pad_token_id=self.model.config.eos_token_id)
        assert tuple(out.shape) == (prompt.shape[0], prompt.shape[1] + new_tokens), tuple(out.shape)

    def respond(self, batches, new_tokens):
        """The same batches through transformers' generate, left-padded with an attention mask."""
        for prompts in batches:
            T = max(map(len, prompts))
            ids = self.torch.zeros((len(prompts), T), dtype=self.torch.long)
            mask = self.torch.zeros((len(prompts), T), dtype=self.torch.long)
            for i, prompt in enumerate(prompts):
                ids[i, T - len(prompt):] = self.torch.tensor(prompt)
                mask[i, T - len(prompt):] = 1
            out = self.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=self.model.config.eos_token_id)
            assert tuple(out.shape) == (len(prompts), T + new_tokens), tuple(out.shape)

    def info(self):
        return {"torch_threads": self.torch.get_num_threads(), "torch_head": self.head, **self.extra}


# ---------------------------------------------------------------------------------------------
# Worker: one row, one framework, in this process

def run_worker(args):
    """Run one row on one framework; print RESULT_PREFIX + JSON with the figures and peak memory."""
    for name in THREAD_ENV:                          # before NumPy (and its BLAS) loads
        os.environ[name] = str(args.threads)
    name, row = args.only[0], ROWS[args.only[0]]
    side = (MinigptSide if args.framework == "minigpt" else TorchSide)(args)
    result = {"row": name, "framework": args.framework,
              "baseline_rss_mib": current_rss_mib()}  # the framework imported, nothing built yet
    measure = {"train": measure_step, "eval": measure_step, "tasks": measure_task_steps,
               "generate": measure_generation, "chat": measure_chat_turn, "responses": measure_responses,
               "epoch": measure_epoch}[row.kind]
    result.update(measure(side, row, args))          # builds, resets the peak, times
    work_peak_mib = peak_rss_mib()
    result.update(side.info(), threads=args.threads,
                  work_peak_rss_mib=work_peak_mib if result["peak_was_reset"] else None,  # timed work alone
                  peak_rss_mib=max(result["setup_peak_rss_mib"], work_peak_mib))       # ru_maxrss, whole run
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def measure_step(side, row, args):
    """A training step (train-*) or forward + loss under no_grad (eval-*) on one synthetic batch."""
    side.build(row.model, train=row.kind == "train", lora=row.lora)
    inputs, targets = synthetic_batch(row, args.seed)
    setup = setup_done()
    step = side.train_step if row.kind == "train" else side.eval_loss
    losses = []
    times = time_calls(lambda: losses.append(step(inputs, targets)), warmup_of(row, args),
                       args.repeats or row.repeats)
    return {**setup, "value": statistics.median(times), "unit": "s", "times": times, "loss": losses[-1]}


def measure_generation(side, row, args):
    """Greedy decoding of args.gen_tokens tokens after a random prompt: tokens per second."""
    import numpy as np
    side.build_generator()
    prompt = np.random.default_rng(args.seed).integers(0, 50257, size=(row.batch, row.seq_len))  # (1, 100)
    setup = setup_done()
    times = time_calls(lambda: side.generate(prompt, args.gen_tokens, row.use_cache), warmup_of(row, args),
                       args.repeats or row.repeats)
    return {**setup, "value": args.gen_tokens / statistics.median(times), "unit": "tok/s", "times": times}


def measure_chat_turn(side, row, args):
    """A chat's CHAT_TURNS-th turn, after exchanges of random messages and greedy replies (minigpt only):
    the time to its first token with the KV cache kept across turns (only the new message runs) and with
    the whole history recomputed, then its reply's tokens/s, each step attending to the whole history."""
    import numpy as np
    from minigpt.generation import CachedContext
    side.build_generator()
    rng = np.random.default_rng(args.seed)
    chat, ids = CachedContext(side.model), []
    for _ in range(CHAT_TURNS - 1):
        ids += rng.integers(0, 50257, size=CHAT_MESSAGE_TOKENS).tolist()
        ids += list(chat.generate(ids, CHAT_REPLY_TOKENS))
    ids += rng.integers(0, 50257, size=CHAT_MESSAGE_TOKENS).tolist()           # the new turn's message
    cached = chat.cache.length                                               # all but the last reply token
    setup = setup_done()
    warmup, repeats = warmup_of(row, args), args.repeats or row.repeats

    def kept():
        chat.cache.truncate(cached)                                          # as the turn began
        chat.next_logits(ids)                                                # runs the message (+1 token)

    def reply():
        chat.cache.truncate(cached)
        assert len(list(chat.generate(ids, args.gen_tokens))) == args.gen_tokens
    kept_times = time_calls(kept, warmup, repeats)
    recomputed_times = time_calls(lambda: CachedContext(side.model).next_logits(ids), warmup, repeats)
    reply_times = time_calls(reply, warmup, repeats)
    return {**setup, "value": statistics.median(kept_times), "unit": "s", "times": kept_times,
            "recomputed_s": statistics.median(recomputed_times), "recomputed_times": recomputed_times,
            "reply_tok_s": args.gen_tokens / statistics.median(reply_times), "reply_times": reply_times,
            "history_tokens": len(ids), "new_tokens": len(ids) - cached}


def measure_task_steps(side, row, args):
    """Training steps of `python train.py` itself: its model, on its first batches (prepared by --prepare)."""
    batches, _ = load_prepared(args.data_file)
    side.build(row.model, train=True)
    setup = setup_done()
    losses = []
    order = iter(range(10**9))
    times = time_calls(lambda: losses.append(side.train_step(*batches[next(order) % len(batches)])),
                       warmup_of(row, args), args.repeats or row.repeats)
    return {**setup, "value": statistics.median(times), "unit": "s", "times": times, "loss": losses[-1],
            "tokens_per_batch": [inputs.size for inputs, _ in batches]}


def measure_responses(side, row, args):
    """Test-set responses of the reference job: its 110 test prompts, in minigpt's ragged batches."""
    _, meta = load_prepared(args.data_file)
    side.build_generator()
    setup = setup_done()
    prompts = meta["prompts"]
    batches = [[prompts[i] for i in batch] for batch in meta["batches"]]
    times = time_calls(lambda: side.respond(batches, RESPONSE_TOKENS), warmup_of(row, args),
                       args.repeats or row.repeats)
    return {**setup, "value": len(prompts) / statistics.median(times), "unit": "responses/s", "times": times,
            "batches": [len(batch) for batch in batches]}


def measure_epoch(side, row, args):
    """The epoch time of the fine-tuning job: collate + mean step time x batches, from a few steps.

    The timed batches sit at evenly spaced quantiles of the epoch's batch sizes, so their mean step
    stands for the epoch. PyTorch always runs the reference pipeline: plain batches, full head.
    """
    reference = args.framework == "torch"
    batches, meta = load_prepared(args.data_file)
    collate_s, n_examples = meta["collate_s"], meta["examples"]
    side.build(row.model, train=True)
    setup = setup_done()
    sizes = [inputs.size for inputs, _ in batches]                     # B*T of each batch
    warm, picks = stratified_picks(sizes, args.epoch_steps)
    losses, times = [], []
    for k in [warm] * warmup_of(row, args) + picks:
        start = time.perf_counter()
        losses.append(side.train_step(*batches[k], full_head=reference))
        times.append(time.perf_counter() - start)
    times = times[warmup_of(row, args):]
    seconds_per_token = sum(times) / sum(sizes[k] for k in picks)
    return {**setup, "value": collate_s + statistics.mean(times) * len(batches), "unit": "s", "times": times,
            "loss": losses[-1], "batches": len(batches), "examples": n_examples, "collate_s": collate_s,
            "picked_batches": picks, "picked_tokens": [sizes[k] for k in picks], "epoch_tokens": sum(sizes),
            "token_scaled_epoch_s": collate_s + seconds_per_token * sum(sizes),    # a second estimate
            "kept_targets": int(sum((targets != -100).sum() for _, targets in batches))}


def synthetic_batch(row, seed):
    """inputs, targets (B, T) int64 with ~40% of targets = -100; the same on both sides for a seed."""
    import numpy as np
    rng = np.random.default_rng(seed)
    V = MODELS[row.model]["vocab_size"]
    inputs = rng.integers(0, V, size=(row.batch, row.seq_len), dtype=np.int64)        # (B, T)
    targets = rng.integers(0, V, size=(row.batch, row.seq_len), dtype=np.int64)       # (B, T)
    targets[rng.random(targets.shape) < IGNORED_FRACTION] = -100
    return inputs, targets


# ---------------------------------------------------------------------------------------------
# Prepared data: real batches and prompts, made by minigpt's own pipeline in a process of their own
# (--prepare), so the PyTorch worker reads plain arrays and never imports minigpt (whose allocator
# setting would change PyTorch's process too).

def prepare_data(args):
    """Write the data of one row for one framework to args.data_file."""
    row = ROWS[args.only[0]]
    sys.path[:0] = [str(REPO_ROOT)]
    batches, meta = {"epoch": epoch_batches, "tasks": task_batches, "responses": response_prompts}[row.kind](
        row, args, reference=args.framework == "torch")
    save_prepared(args.data_file, batches, meta)
    return 0


def epoch_batches(row, args, reference):
    """One epoch of the fine-tuning job from the real DataLoader, with the seconds it took to collate.
    `reference`: the PyTorch pipeline's batches (no grouping, no masking)."""
    from minigpt.data import InstructionDataset, load_instruction_data, split_data
    from minigpt.loader import DataLoader
    from minigpt.tokenizer import get_tokenizer
    train, _, _ = split_data(load_instruction_data(args.data))                          # 935 of 1,100
    vocab_dir = args.vocab_dir if Path(args.vocab_dir).is_dir() else None               # else tiktoken's
    dataset = InstructionDataset(train, get_tokenizer("gpt2", vocab_dir=vocab_dir), style="alpaca",
                                 mask_prompt=row.mask_prompt and not reference, allowed_max_length=1024)
    loader = DataLoader(dataset, EPOCH_BATCH_SIZE, shuffle=True, seed=args.seed,
                        group_by_length=row.group_by_length and not reference)
    start = time.perf_counter()
    batches = list(loader)
    return batches, {"collate_s": time.perf_counter() - start, "examples": len(train)}


def task_batches(row, args, reference):
    """The first batches `python train.py` trains on: its own loader over the built-in tasks."""
    from minigpt.data import InstructionDataset
    from minigpt.pipeline import sft_run
    from minigpt.tokenizer import get_tokenizer
    c = sft_run.make_config(n_train=row.batch * 20)
    train, _, _ = sft_run.load_splits(c.data, c.data_dir, c.shuffle_seed, c.data_seed, c.n_train, c.n_val,
                                      c.n_test, c.prompt_style)
    dataset = InstructionDataset(train, get_tokenizer(c.tokenizer), c.prompt_style, c.mask_prompt,
                                 c.context_length)
    loader = sft_run.training_loader(dataset, c.batch_size, c.seed, c.group_by_length)
    return list(loader), {}


def response_prompts(row, args, reference):
    """The reference job's 110 test prompts (GPT-2 tokens) and minigpt's batches of them."""
    from minigpt.data import load_instruction_data, split_data
    from minigpt.model import GPTConfig
    from minigpt.pipeline.responses import prompt_ids, response_batches
    from minigpt.tokenizer import get_tokenizer
    _, _, test = split_data(load_instruction_data(args.data))                           # 110 of 1,100
    vocab_dir = args.vocab_dir if Path(args.vocab_dir).is_dir() else None
    tokenizer = get_tokenizer("gpt2", vocab_dir=vocab_dir)
    prompts = [prompt_ids(tokenizer, entry, "alpaca") for entry in test]
    batches = response_batches(GPTConfig(**MODELS[row.model]), prompts, RESPONSE_TOKENS)
    return [], {"prompts": prompts, "batches": batches}


def save_prepared(path, batches, meta):
    import numpy as np
    arrays = {f"{kind}_{i}": array for i, pair in enumerate(batches)
              for kind, array in zip(("inputs", "targets"), pair)}
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def load_prepared(path):
    """(list of (inputs, targets), meta dict) written by save_prepared."""
    import numpy as np
    with np.load(path, allow_pickle=False) as archive:
        n = sum(name.startswith("inputs_") for name in archive.files)
        batches = [(archive[f"inputs_{i}"], archive[f"targets_{i}"]) for i in range(n)]
        return batches, json.loads(str(archive["meta"][()]))


def stratified_picks(sizes, steps):
    """A warm-up batch (the median size) and `steps` batches at evenly spaced quantiles of `sizes`."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    picks = [order[min(int((k + 0.5) / steps * len(order)), len(order) - 1)] for k in range(steps)]
    return order[len(order) // 2], picks


def warmup_of(row, args):
    return row.warmup if args.warmup is None else args.warmup


def time_calls(fn, warmup, repeats):
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def setup_done():
    """Record the peak RSS of the setup (imports, model, data), then start a new peak for the timed work.

    On Linux, writing 5 to /proc/self/clear_refs resets the high-water mark that ru_maxrss reports.
    """
    setup = {"setup_peak_rss_mib": peak_rss_mib(), "peak_was_reset": False}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        setup["peak_was_reset"] = True
    except OSError:
        pass
    return setup


def current_rss_mib():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def peak_rss_mib():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024   # bytes on macOS, KiB on Linux


def blas_threads():
    """Threads NumPy's BLAS will use, asked from the loaded OpenBLAS/MKL library; None if unknown."""
    import ctypes
    try:
        from threadpoolctl import threadpool_info
        return max(info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas")
    except (ImportError, ValueError):
        pass
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "blas" in line.lower() or "mkl_rt" in line.lower()}
    except OSError:
        return None
    for lib in libs:
        for symbol in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                       "openblas_get_num_threads64_", "openblas_get_num_threads", "MKL_Get_Max_Threads"):
            try:
                return int(getattr(ctypes.CDLL(lib), symbol)())
            except (OSError, AttributeError):
                continue
    return None


# ---------------------------------------------------------------------------------------------
# Driver: a subprocess per (row, framework), then the table

PREPARED_KINDS = ("epoch", "tasks", "responses")  # rows that run on real data, made by --prepare


def run_in_subprocess(name, framework, args, busy=None):
    """One worker process for (row, framework), its data prepared first; with `busy`, a neighbour program
    (BUSY_PROGRAMS) runs on all cores while it works."""
    common = ["--only", name, "--framework", framework, "--threads", str(args.threads),
              "--seed", str(args.seed),
              "--data", str(args.data), "--vocab-dir", str(args.vocab_dir)]
    env = {**os.environ, **{k: str(args.threads) for k in THREAD_ENV}, "HF_HUB_OFFLINE": "1"}
    label = f"  {name:<19} {framework:<8}" + (f" beside {busy}" if busy else "")
    with tempfile.TemporaryDirectory() as scratch:
        data_file = str(Path(scratch) / "data.npz")
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", *common,
                   "--data-file", data_file,
                   "--gen-tokens", str(args.gen_tokens),
                   "--epoch-steps", str(args.epoch_steps), "--torch-head", args.torch_head]
        if args.repeats:
            command += ["--repeats", str(args.repeats)]
        if args.warmup is not None:
            command += ["--warmup", str(args.warmup)]
        if ROWS[name].kind in PREPARED_KINDS:
            prepare = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--prepare", *common,
                                      "--data-file", data_file], capture_output=True, text=True, env=env)
            if prepare.returncode != 0:
                print(f"{label} FAILED to prepare its data")
                print("    " + "\n    ".join(prepare.stderr.strip().splitlines()[-15:]))
                return {"row": name, "framework": framework, "error": prepare.stderr[-4000:]}
        print(label, end=" ", flush=True)
        start = time.perf_counter()
        neighbour = None
        if busy:
            neighbour = subprocess.Popen([sys.executable, "-c", BUSY_PROGRAMS[busy]], env={
                **os.environ, **{k: str(usable_cores()) for k in THREAD_ENV}})
            time.sleep(1.0)                                      # let it get going
        try:
            proc = subprocess.run(command, capture_output=True, text=True, env=env)
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        print(f"FAILED (exit {proc.returncode})")
        print("    " + "\n    ".join((proc.stderr or proc.stdout).strip().splitlines()[-15:]))
        return {"row": name, "framework": framework, "error": (proc.stderr or proc.stdout)[-4000:]}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    work_peak = result.get("work_peak_rss_mib")
    print(f"{format_value(result['value'], result['unit']):>12}  peak {result['peak_rss_mib']:,.0f} MiB"
          + (f" (timed work {work_peak:,.0f} MiB)" if work_peak else "")
          + f"  [{time.perf_counter() - start:.0f} s]")
    return result


def format_value(value, unit):
    if value is None:
        return "-"
    if unit == "s":
        if value < 1:
            return f"{value * 1e3:.1f} ms"
        return f"{value:.2f} s" if value < 120 else f"{value / 60:.1f} min"
    if unit == "MiB":
        return f"{value:,.0f} MiB"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.1f} {unit}"


def verdict(value, target):
    if value is None or target is None:
        return ""
    op, bound = target
    return "met" if (value <= bound if op == "<=" else value >= bound) else "MISSED"


def table_rows(names, results):
    """(row, metric, minigpt, PyTorch, ratio, target, verdict) strings for every row and its memory."""
    rows = []

    def figure(name, framework, key="value"):
        return results.get((name, framework), {}).get(key)

    def add(label, metric, unit, ours, theirs, target):
        ratio = ours / theirs if ours is not None and theirs else None
        rows.append((label, metric, format_value(ours, unit), format_value(theirs, unit),
                     format_value(ratio, "x"), f"{target[0]} {target[1]}x" if target else "",
                     verdict(ratio, target)))

    metrics = {"train": "step", "eval": "forward+loss", "tasks": "step", "generate": "tokens/s",
               "responses": "responses/s", "epoch": "epoch (projected)"}
    for name in names:
        row = ROWS[name]
        if row.kind == "chat":  # minigpt against itself (*): the KV cache kept across turns, or not
            add(name, "first token, turn 5 (*)", "s", figure(name, "minigpt"),
                figure(name, "minigpt", "recomputed_s"), None)
            add("", "reply tokens/s", "tok/s", figure(name, "minigpt", "reply_tok_s"), None, None)
            add("", "peak RSS", "MiB", figure(name, "minigpt", "peak_rss_mib"), None, None)
            continue
        theirs = REFERENCE_EPOCH_ROW if row.kind == "epoch" else name
        unit = {"generate": "tok/s", "responses": "responses/s"}.get(row.kind, "s")
        add(name, metrics[row.kind], unit, figure(name, "minigpt"), figure(theirs, "torch"), row.target)
        add("", "peak RSS", "MiB", figure(name, "minigpt", "peak_rss_mib"),
            figure(theirs, "torch", "peak_rss_mib"), MEMORY_TARGET)
        if row.lora:  # minigpt's LoRA step against its own full fine-tuning step (ratio: LoRA / full)
            add("", "step, vs full (*)", "s", figure(name, "minigpt"), figure(LORA_FULL_ROW, "minigpt"),
                LORA_VS_FULL_TARGET)
            add("", "peak RSS, vs full (*)", "MiB", figure(name, "minigpt", "peak_rss_mib"),
                figure(LORA_FULL_ROW, "minigpt", "peak_rss_mib"), MEMORY_TARGET)
    if "generate-cached" in names and "generate-uncached" in names:
        speedups = []
        for framework in ("minigpt", "torch"):
            cached, uncached = figure("generate-cached", framework), figure("generate-uncached", framework)
            speedups.append(cached / uncached if cached and uncached else None)
        op, bound = CACHE_SPEEDUP_TARGET
        rows.append(("cache speed-up", "cached/uncached", format_value(speedups[0], "x"),
                     format_value(speedups[1], "x"), "", f"{op} {bound}x (minigpt)",
                     verdict(speedups[0], CACHE_SPEEDUP_TARGET)))
    return rows


def print_table(rows):
    header = ("row", "metric", "minigpt", "PyTorch", "ratio", "target", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):  # names and targets to the left, figures to the right
        return "  ".join(c.rjust(w) if 2 <= i <= 4 else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    print(line(header))
    print("-" * len(line(header)))
    for r in rows:
        print(line(r))


def machine_info(args):
    import numpy as np
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # show_config's layout differs between NumPy versions
        blas = "unknown"
    versions = {}
    for package in ("torch", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": usable_cores(),
            "threads": args.threads, "load_average": load, "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas, **versions, "platform": platform.platform()}


def usable_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def print_header(command, machine):
    print(f"command:  {command}")
    print(f"machine:  {machine['cpu']}, {machine['logical_cores']} logical cores "
          f"({machine['usable_cores']} usable), {machine['platform']}")
    print(f"software: Python {machine['python']}, NumPy {machine['numpy']} ({machine['blas']}), "
          f"torch {machine['torch']}, transformers {machine['transformers']}")
    load = f"{machine['load_average']:.2f}" if machine["load_average"] is not None else "unknown"
    print(f"threads:  {machine['threads']} for both (--threads, else $OMP_NUM_THREADS, else all cores); "
          f"load average {load} at start (timings are noisy when it exceeds the threads)")


def drive(args):
    names = args.only or list(QUICK_ROWS if args.quick else ROWS)
    frameworks = ["minigpt", "torch"] if args.framework == "both" else [args.framework]
    machine = machine_info(args)
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    print_header(command, machine)
    if "torch" in frameworks and importlib.util.find_spec("torch") is None:
        print("PyTorch is not installed: minigpt figures only (pip install torch==2.13.0 transformers)")
        frameworks.remove("torch")
    if not Path(args.data).is_file() and any(ROWS[n].kind == "epoch" for n in names):
        print(f"skipping the epoch rows: {args.data} not found (pass --data PATH to instruction-data.json)")
        names = [n for n in names if ROWS[n].kind != "epoch"]
    if not names or not frameworks:
        print("nothing to run")
        return 0
    print()
    if args.busy:
        return drive_busy(names if args.only else list(BUSY_ROWS), frameworks, args, command, machine)
    results = {}
    for name in names:
        for framework in frameworks:
            kind = ROWS[name].kind
            key = (REFERENCE_EPOCH_ROW if framework == "torch" and kind == "epoch" else name, framework)
            if key in results or (framework == "torch" and kind == "chat"):   # chat: minigpt alone
                continue
            if (framework == "torch" and kind in ("generate", "responses")
                    and machine["transformers"] == "not installed"):
                print(f"  {name:<18} torch    skipped: transformers is not installed")
                continue
            results[key] = run_in_subprocess(*key, args)
    print()
    rows = table_rows(names, results)
    print_table(rows)
    print(f"\nratio = minigpt / PyTorch; times are medians of the timed runs after "
          f"{'5 (small models) or 1' if args.warmup is None else args.warmup} warm-up run(s).\n"
          f"PyTorch: benchmarks/torch_gpt2.py (eager, SDPA attention, {args.torch_head} output "
          f"head) for train/eval; transformers GPT2LMHeadModel for generate.\nepoch: collate + mean of "
          f"{args.epoch_steps} timed steps (batches at size quantiles) x batches; the PyTorch figure is "
          f"the reference pipeline (no grouping, no masking, full head).\n(*) LoRA rows: the PyTorch "
          f"column holds minigpt's full fine-tuning ({LORA_FULL_ROW}; run it too); chat-turn: minigpt "
          f"with the history recomputed instead of the KV cache kept.")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "machine": machine,
                                               "results": list(results.values()), "table": rows}, indent=2))
        print(f"results saved to {args.json}")
    failed = [f"{r['row']} [{r['framework']}]" for r in results.values() if "error" in r]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def drive_busy(names, frameworks, args, command, machine):
    """Each row quiet, then beside the --busy neighbour; print every framework's slowdown."""
    results = {}
    for name in names:
        for framework in frameworks:
            for busy in (None, args.busy):
                results[(name, framework, busy)] = run_in_subprocess(name, framework, args, busy=busy)
    print()
    header = ("row", "minigpt quiet", "busy", "slowdown", "PyTorch quiet", "busy", "slowdown", "target", "")
    table = []
    for name in names:
        unit = {"generate": "tok/s", "responses": "responses/s"}.get(ROWS[name].kind, "s")
        cells, slowdowns = [name], {}
        for framework in ("minigpt", "torch"):
            quiet = results.get((name, framework, None), {}).get("value")
            busy = results.get((name, framework, args.busy), {}).get("value")
            slowdown = None
            if quiet and busy:
                slowdown = busy / quiet if unit == "s" else quiet / busy
            slowdowns[framework] = slowdown
            cells += [format_value(quiet, unit), format_value(busy, unit), format_value(slowdown, "x")]
        ours, theirs = slowdowns["minigpt"], slowdowns["torch"]
        bound = min(BUSY_TARGET, theirs) if theirs else BUSY_TARGET
        cells += [f"<= {BUSY_TARGET:g}x and <= PyTorch's", verdict(ours, ("<=", bound))]
        table.append(tuple(cells))
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for cells in [header, *table]:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    print(f"\nslowdown = time beside the neighbour / time alone, each in a fresh process; neighbour "
          f"{args.busy!r}: {BUSY_PROGRAMS[args.busy]!r} on {usable_cores()} threads")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "machine": machine, "busy": args.busy,
                                               "results": [dict(r, busy=key[2])
                                                           for key, r in results.items()],
                                               "table": table}, indent=2))
    return 1 if any("error" in r for r in results.values()) else 0


def default_threads():
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else usable_cores()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="rows: " + ", ".join(ROWS))
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: only {', '.join(QUICK_ROWS)}, 1 timed run each")
    parser.add_argument("--only", action="append", metavar="ROW", choices=list(ROWS),
                        help="run only this row (repeatable); see the list of rows below")
    parser.add_argument("--framework", choices=["both", "minigpt", "torch"], default="both",
                        help="which side to run (default both; torch is skipped when not installed)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per row after the warm-up (default 3 for gpt2-small, 30-40 for the "
                             "byte model; 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs first (default 5 for the small models' steps, else 1)")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="threads for NumPy's BLAS and for torch (default: $OMP_NUM_THREADS, else all "
                             "usable cores)")
    parser.add_argument("--gen-tokens", type=int, default=100, help="new tokens per generation (default 100)")
    parser.add_argument("--epoch-steps", type=int, default=5,
                        help="timed training steps the epoch time is projected from (default 5)")
    parser.add_argument("--torch-head", choices=["full", "kept"], default="full",
                        help="PyTorch train/eval rows: output head on all positions (default, the usual "
                             "PyTorch code) or only where the target is kept, like minigpt")
    parser.add_argument("--seed", type=int, default=123, help="seed of the batches, prompt and data order")
    parser.add_argument("--data", default=str(SHARED_DATA / "instruction-data.json"),
                        help="instruction-data.json for the epoch rows (skipped when missing)")
    parser.add_argument("--vocab-dir", default=str(SHARED_DATA / "gpt2"),
                        help="folder with GPT-2's encoder.json and vocab.bpe (else tiktoken's download)")
    parser.add_argument("--json", metavar="PATH", help="also save the results and the table as JSON")
    parser.add_argument("--busy", choices=sorted(BUSY_PROGRAMS),
                        help="run each row alone and then beside a busy neighbour (blas: NumPy multiplying "
                             "matrices on all cores; spin: a busy Python loop) and print each framework's "
                             f"slowdown (rows: {', '.join(BUSY_ROWS)} unless --only)")
    parser.add_argument("--prepare", action="store_true",
                        help="internal: write one --only row's data for --framework to --data-file")
    parser.add_argument("--data-file", help="internal: the prepared data of a worker")
    parser.add_argument("--worker", action="store_true",
                        help="internal: run one --only row with one --framework in this process, print JSON")
    args = parser.parse_args(argv)
    if args.quick and args.repeats is None:
        args.repeats = 1
    if args.threads < 1 or (args.repeats is not None and args.repeats < 1) or (args.warmup or 0) < 0 \
            or args.gen_tokens < 1 or args.epoch_steps < 1:
        parser.error("--threads, --repeats, --gen-tokens and --epoch-steps must be >= 1, --warmup >= 0")
    if (args.worker or args.prepare) and (not args.only or len(args.only) != 1 or args.framework == "both"):
        parser.error("--worker and --prepare need exactly one --only ROW and --framework minigpt or torch")
    return args


def main(argv=None):
    args = parse_args(argv)
    sys.path[:0] = [str(REPO_ROOT), str(Path(__file__).resolve().parent)]   # this checkout's minigpt first
    if args.prepare:
        return prepare_data(args)
    return run_worker(args) if args.worker else drive(args)


if __name__ == "__main__":
    sys.exit(main())
