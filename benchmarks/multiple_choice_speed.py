"""Questions per second of log-likelihood scoring at GPT-2 124M's shape: shared context against separate rows.

    python benchmarks/multiple_choice_speed.py                  # both layouts, both ways, 48 questions each
    python benchmarks/multiple_choice_speed.py --questions 16   # quicker

minigpt/evaluate/multiple_choice.py scores a question either with each choice as its own row (context +
choice, llm.c's way) or with the context run once into a KV cache that the choices continue from. This
times both on random weights of GPT-2 124M's shape (speed does not depend on the values) and synthetic
questions of two layouts, made of random words (GPT-2's tokenizer, offline from --vocab-dir):

    hellaswag-like   a 45-word context and 4 endings of 18 words (HellaSwag: ~50 and ~25 tokens)
    mmlu-letter-like a 90-word context listing the choices and 4 one-token continuations " A" .. " D"

It checks that both ways give the same log-likelihoods, then prints questions per second. Not a test.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from minigpt.evaluate.multiple_choice import Question, score_questions  # noqa: E402
from minigpt.model import GPTConfig, GPTModel  # noqa: E402
from minigpt.pipeline.report import machine  # noqa: E402
from minigpt.tokenizer import get_tokenizer  # noqa: E402

WORDS = ("the", "man", "is", "holding", "a", "rope", "and", "then", "climbs", "up", "wall", "while", "people",
         "watch", "from", "below", "she", "puts", "paint", "on", "brush", "water", "into", "bucket", "slowly")
LAYOUTS = {"hellaswag-like": (45, 18), "mmlu-letter-like": (90, None)}  # context words, ending words


def synthetic_questions(layout, n, rng):
    context_words, ending_words = LAYOUTS[layout]

    def text(words):
        return " ".join(rng.choice(WORDS, size=words))
    if ending_words is None:
        return [Question(text(context_words) + "\nAnswer:", ("A", "B", "C", "D"), 0) for _ in range(n)]
    return [Question(text(context_words), tuple(text(ending_words) for _ in range(4)), 0) for _ in range(n)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=48, help="questions per layout (default: 48)")
    parser.add_argument("--vocab-dir", default=str(REPO_ROOT.parent / "shared" / "data" / "gpt2"),
                        help="folder with GPT-2's encoder.json and vocab.bpe (else tiktoken downloads them)")
    args = parser.parse_args(argv)
    tokenizer = get_tokenizer("gpt2", args.vocab_dir if Path(args.vocab_dir).is_dir() else None)
    model = GPTModel(GPTConfig.preset("gpt2-small"), seed=0)
    print(f"machine: {machine()}\nmodel: GPT-2 124M shape, random weights, float32\n")
    print(f"{'layout':<18} {'tokens/question':>15} {'separate rows':>18} {'shared context':>18} "
          f"{'speed-up':>9}")
    for layout in LAYOUTS:
        questions = synthetic_questions(layout, args.questions, np.random.default_rng(0))
        score_questions(model, tokenizer, questions[:2], progress=False)          # warm-up
        rates, results = {}, {}
        for share in (False, True):
            start = time.perf_counter()
            results[share] = score_questions(model, tokenizer, questions, share_context=share, progress=False)
            rates[share] = len(questions) / (time.perf_counter() - start)
        for a, b in zip(results[False].logprobs, results[True].logprobs):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
        tokens = np.mean([len(tokenizer.encode(q.context))
                          + sum(len(tokenizer.encode(" " + c)) for c in q.choices) for q in questions])
        print(f"{layout:<18} {tokens:>15.0f} {rates[False]:>13.2f} q/s {rates[True]:>13.2f} q/s "
              f"{rates[True] / rates[False]:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
