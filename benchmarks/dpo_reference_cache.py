"""What caching the reference model's log-probabilities saves in a DPO step. Prints figures; not a test.

    python benchmarks/dpo_reference_cache.py                  # small model, 8 batches of 8 pairs, ~10 s
    python benchmarks/dpo_reference_cache.py --emb-dim 768 --layers 12 --heads 12    # gpt2-small (slow)

A DPO step needs log ref(y|x) for the chosen and rejected responses of its pairs. Computed on the fly,
each step runs the frozen reference model forward before the policy's forward + backward + AdamW;
cached (minigpt.dpo.reference_logprobs, one pass over the dataset), the step runs the policy only.
Both variants time the same batches of the real preference data (GPT-2 tokenizer, Alpaca prompt),
alternately, from random weights (speed does not depend on the values). Printed: medians of the CPU
time of this process (all its threads), which another busy process on the machine disturbs far less
than wall-clock time, and of the wall-clock time. One thread by default (--threads), so that neither
BLAS's waiting threads nor a core shared with another job count.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_VOCAB = SHARED_DATA / "gpt2"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED_DATA / "instruction-data-with-preference.json"),
                        help="a preference JSON file (default: the one in ../shared/data)")
    parser.add_argument("--vocab-dir", default=str(SHARED_VOCAB) if SHARED_VOCAB.is_dir() else None,
                        help="folder with GPT-2's encoder.json and vocab.bpe (default: ../shared/data/gpt2)")
    parser.add_argument("--emb-dim", type=int, default=128, help="model width (default 128)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step (default 8)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="threads for BLAS and minigpt (default 1)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MINIGPT_NUM_THREADS"):
        os.environ[name] = str(args.threads)              # read once, when NumPy and minigpt load
    import numpy as np

    from minigpt import GPTConfig, GPTModel, no_grad
    from minigpt.dpo import batch_logprobs, dpo_batch_loss, dpo_loss, reference_logprobs
    from minigpt.optim import AdamW
    from minigpt.preference import PreferenceDataset, load_preference_data
    from minigpt.tokenizer import gpt2_tokenizer

    try:
        entries = load_preference_data(args.data)
        tokenizer = gpt2_tokenizer(args.vocab_dir)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_pairs = args.batch_size * args.steps
    dataset = PreferenceDataset(entries[:n_pairs], tokenizer, allowed_max_length=1024)
    cfg = GPTConfig(emb_dim=args.emb_dim, n_layers=args.layers, n_heads=args.heads)
    policy, reference = GPTModel(cfg, seed=0), GPTModel(cfg, seed=1)
    optimizer = AdamW(policy.parameters(), lr=5e-6)
    batches = list(dataset.batches(args.batch_size))

    def cached_step(batch):
        return dpo_batch_loss(policy, batch, cache)[0]

    def uncached_step(batch):
        with no_grad():
            ref = batch_logprobs(reference, batch).data                   # (2B,)
        logp = batch_logprobs(policy, batch)                              # (2B,)
        return dpo_loss(logp[:batch.size], logp[batch.size:], ref[:batch.size], ref[batch.size:])

    def train_step(step, batch):
        cpu, wall = time.process_time(), time.perf_counter()
        loss = step(batch)
        policy.zero_grad()
        loss.backward()
        optimizer.step()
        return time.process_time() - cpu, time.perf_counter() - wall

    for _ in range(2):                                                    # warm-up: first-touch costs
        train_step(uncached_step, batches[0])
    start = time.process_time()
    cache = reference_logprobs(reference, dataset, batch_size=args.batch_size)
    cache_seconds = time.process_time() - start
    train_step(cached_step, batches[0])
    times = {cached_step: [], uncached_step: []}
    for batch in batches:
        for step in (uncached_step, cached_step):
            times[step].append(train_step(step, batch))
    tokens = np.mean([b.inputs.size for b in batches])
    print(f"model: emb {args.emb_dim} x {args.layers} layers x {args.heads} heads, V {cfg.vocab_size} "
          f"({policy.num_parameters() / 1e6:.1f}M parameters), {args.threads} thread(s)")
    print(f"data:  {args.steps} batches of {args.batch_size} pairs (2 x {args.batch_size} sequences, "
          f"{tokens:.0f} token positions on average)")
    medians = {}
    for label, step in (("reference run every step", uncached_step), ("reference cached", cached_step)):
        cpu, wall = medians[step] = [statistics.median(column) for column in zip(*times[step])]
        print(f"step, {label + ':':26s} {1000 * cpu:7.1f} ms CPU, {1000 * wall:7.1f} ms wall")
    cpu_saving, wall_saving = (1 - c / u for c, u in zip(medians[cached_step], medians[uncached_step]))
    print(f"caching saves {100 * cpu_saving:.0f}% of a step's CPU time "
          f"({100 * wall_saving:.0f}% of its wall time)")
    print(f"the cache: {1000 * cache_seconds:.1f} ms CPU once for {len(dataset)} pairs "
          f"({1000 * cache_seconds / args.steps:.1f} ms per batch); while training, the reference model "
          f"({4e-6 * reference.num_parameters():.0f} MB in float32) need not stay in memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
