"""Built-in instruction dataset: small tasks whose answers can be checked exactly (draft)."""
import numpy as np

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD_LEN = (3, 5)
SORT_LEN = (3, 5)
COUNT_WORDS = (2, 6)
COUNT_WORD_LEN = (1, 3)
ADD_RANGE = (10, 99)
SORT_DISTINCT = True

INSTRUCTIONS = {
    "reverse": "Reverse.",
    "sort": "Sort.",
    "uppercase": "Uppercase.",
    "count": "Count words.",
    "add": "Add.",
}
TASKS = tuple(INSTRUCTIONS)


def _word(rng, lo, hi, distinct=False):
    n = int(rng.integers(lo, hi + 1))
    idx = rng.choice(len(LETTERS), size=n, replace=not distinct)
    return "".join(LETTERS[i] for i in idx)


def make_example(task, rng):
    if task == "reverse":
        w = _word(rng, *WORD_LEN)
        inp, out = w, w[::-1]
    elif task == "sort":
        w = _word(rng, *SORT_LEN, distinct=SORT_DISTINCT)
        inp, out = w, "".join(sorted(w))
    elif task == "uppercase":
        w = _word(rng, *WORD_LEN)
        inp, out = w, w.upper()
    elif task == "count":
        n = int(rng.integers(COUNT_WORDS[0], COUNT_WORDS[1] + 1))
        inp, out = " ".join(_word(rng, *COUNT_WORD_LEN) for _ in range(n)), str(n)
    elif task == "add":
        a, b = (int(x) for x in rng.integers(ADD_RANGE[0], ADD_RANGE[1] + 1, size=2))
        inp, out = f"{a}+{b}", str(a + b)
    else:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    return {"instruction": INSTRUCTIONS[task], "input": inp, "output": out, "task": task}


def make_task_splits(seed=0, n_train=20000, n_val=250, n_test=500, tasks=TASKS):
    rng = np.random.default_rng(seed)
    sizes = (n_test, n_val, n_train)
    splits = []
    seen = set()
    for n in sizes:
        split = []
        for i in range(n):
            task = tasks[i % len(tasks)]
            for _ in range(1000):
                e = make_example(task, rng)
                key = (e["instruction"], e["input"])
                if key not in seen:
                    break
            else:
                raise ValueError(f"task {task!r} ran out of distinct prompts")
            seen.add(key)
            split.append(e)
        splits.append(split)
    test, val, train = splits
    return train, val, test


def exact_match_by_task(entries, responses):
    hits = {}
    for e, r in zip(entries, responses, strict=True):
        hits.setdefault(e["task"], []).append(r.strip() == e["output"])
    per = {t: sum(h) / len(h) for t, h in hits.items()}
    total = sum(sum(h) for h in hits.values()) / max(1, len(entries))
    return total, per
