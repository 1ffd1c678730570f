"""The built-in instruction dataset: small tasks whose answers can be checked exactly.

`python train.py` with no arguments trains a small GPT from scratch on these, offline, and scores it
by exact match on test prompts it never saw. Each task is one short instruction and an input:

    reverse    "Reverse"      "kqzt"           -> "tzqk"     reorders: output position i reads input n-1-i
    sort       "Sort"         "wbe"            -> "bew"      reorders by value: distinct letters
    uppercase  "Uppercase"    "mopa"           -> "MOPA"     maps each letter to another
    count      "Count words"  "ab c dfe"       -> "3"        computes: counts the spaces
    add        "Add"          "47+8"           -> "55"       computes: digit sums with a carry

Their difficulty is chosen so that a 0.8M-parameter model learns every kind within minutes on a CPU
(measured: README, "Quick start"): words of 3-5 letters, sorting of distinct letters (repeated
letters make the next output ambiguous to locate), 2-6 words to count, and a two-digit plus a
one-digit number (two two-digit numbers needed several times the training). The instructions are
short because every prompt token costs compute in every layer, while only the answer is learned.

One more kind is never in the default mix; it is there to teach a trained model something new
(docs/lora.md: a default run's model learns it through adapters alone, `--data tasks:swapcase,...`):

    swapcase   "Swap case"    "kQzT"           -> "KqZt"     maps each letter by its case

It is clearly new, yet within reach of a few hundred adapter steps: its inputs mix upper and lower
case (the default kinds only ever show lower case) and half of its letters map the other way from
uppercase, while the reading pattern, output position i reads input i, is one the model already has.
(Subtracting was rejected: the model's addition is its weakest kind; doubling each letter is
ambiguous to track on repeated letters.)

Entries use the Alpaca layout plus "task": {"instruction", "input", "output", "task"}.

The kind `chat` is conversations ({"messages": [...], "task": "chat", "follow_up"}, for --prompt-style
chat), never in the default mix: a first request as above on a word (reverse, sort or uppercase), then
one or two requests about the previous answer, "it", which only the conversation can tell (each changes
it: no "Uppercase it" of an uppercase word):

    user "Reverse\nqxbf"  -> "fbxq";  user "Uppercase it" -> "FBXQ";  user "How many letters?" -> "4"

A follow-up reverses or uppercases the previous answer, or counts its letters (only last, as the answer
is then a number). Without the turns before it, no model can answer one: benchmarks/chat_demo.py
measures that a model trained on them reads the conversation (docs/chat.md).
"""
import math

import numpy as np

from .data import expected_reply

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD_LETTERS = (3, 5)        # reverse, sort, uppercase: letters per word
COUNT_WORDS = (2, 6)         # count: words per input
COUNT_WORD_LETTERS = (1, 3)  # count: letters per word
ADD_FIRST = (10, 99)         # add: a two-digit number ...
ADD_SECOND = (1, 9)          # ... plus a one-digit number

INSTRUCTIONS = {
    "reverse": "Reverse",
    "sort": "Sort",
    "uppercase": "Uppercase",
    "count": "Count words",
    "add": "Add",
    "swapcase": "Swap case",
}
FIRST_TURNS = ("reverse", "sort", "uppercase")             # chat: the first request, on a word
FOLLOW_UPS = {                                              # chat: a request about the previous answer
    "Reverse it": lambda answer: answer[::-1],
    "Uppercase it": str.upper,
    "How many letters?": lambda answer: str(len(answer)),   # a number: only as the last request
}
COUNT_REQUEST = "How many letters?"
TASKS = ("reverse", "sort", "uppercase", "count", "add")   # the default mix
CONVERSATION_KINDS = ("chat",)                              # kinds that are conversations (chat template)
KINDS = (*INSTRUCTIONS, *CONVERSATION_KINDS)                # every kind
DATA_PREFIX = "tasks:"                                      # --data tasks:KIND,KIND selects kinds


def _word(rng, lengths, distinct=False):
    n = int(rng.integers(lengths[0], lengths[1] + 1))
    return "".join(LETTERS[i] for i in rng.choice(len(LETTERS), size=n, replace=not distinct))


def make_example(task, rng):
    """One random entry of the given task kind, drawn from `rng` (an np.random.Generator)."""
    if task == "chat":
        return make_conversation(rng)
    if task == "reverse":
        word = _word(rng, WORD_LETTERS)
        text, answer = word, word[::-1]
    elif task == "sort":
        word = _word(rng, WORD_LETTERS, distinct=True)
        text, answer = word, "".join(sorted(word))
    elif task == "uppercase":
        word = _word(rng, WORD_LETTERS)
        text, answer = word, word.upper()
    elif task == "count":
        n = int(rng.integers(COUNT_WORDS[0], COUNT_WORDS[1] + 1))
        text, answer = " ".join(_word(rng, COUNT_WORD_LETTERS) for _ in range(n)), str(n)
    elif task == "add":
        a = int(rng.integers(ADD_FIRST[0], ADD_FIRST[1] + 1))
        b = int(rng.integers(ADD_SECOND[0], ADD_SECOND[1] + 1))
        text, answer = f"{a}+{b}", str(a + b)
    elif task == "swapcase":
        word = _word(rng, WORD_LETTERS)
        upper = rng.random(len(word)) < 0.5                       # each letter's case, a fair coin
        text = "".join(c.upper() if up else c for c, up in zip(word, upper))
        answer = text.swapcase()
    else:
        raise ValueError(f"unknown task {task!r}; choose from: {', '.join(KINDS)}")
    return {"instruction": INSTRUCTIONS[task], "input": text, "output": answer, "task": task}


def make_conversation(rng):
    """A `chat` entry drawn from `rng`: a first request on a word, then one or two about the answer before,
    each of which changes it; counting its letters ends the conversation, as the answer is then a number."""
    first = make_example(FIRST_TURNS[int(rng.integers(len(FIRST_TURNS)))], rng)
    answer = first["output"]
    messages = [{"role": "user", "content": f"{first['instruction']}\n{first['input']}"},
                {"role": "assistant", "content": answer}]
    n_follow_ups = int(rng.integers(1, 3))
    for k in range(n_follow_ups):
        requests = [request for request, change in FOLLOW_UPS.items() if change(answer) != answer]
        if k < n_follow_ups - 1 and requests != [COUNT_REQUEST]:   # an upper-case palindrome has no other
            requests.remove(COUNT_REQUEST)
        request = requests[int(rng.integers(len(requests)))]
        answer = FOLLOW_UPS[request](answer)
        messages += [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]
        if request == COUNT_REQUEST:
            break
    return {"messages": messages, "task": "chat", "follow_up": request}


def prompt_keys(entry):
    """What identifies an entry's question, to hold it out: (instruction, input) of an Alpaca entry; of a
    conversation, every message but the last reply, and its first request as (instruction, input), so
    that no training conversation opens with a held-out prompt (and shows its answer)."""
    if "messages" not in entry:
        return [(entry["instruction"], entry["input"])]
    contents = tuple(message["content"] for message in entry["messages"][:-1])
    return [contents, tuple(contents[0].split("\n", 1))]


def _draw(n, tasks, rng, held_out, unique):
    """n entries, the task kinds in turn, none with a prompt in `held_out`; `unique` holds each out too."""
    entries = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        for _ in range(1000):
            entry = make_example(task, rng)
            prompt = prompt_keys(entry)[0]
            if not any(key in held_out for key in prompt_keys(entry)):
                break
        else:
            raise ValueError(f"task {task!r} ran out of prompts that are not held out")
        if unique:
            held_out.add(prompt)
        entries.append(entry)
    return entries


def make_task_splits(seed=0, n_train=20000, n_val=250, n_test=500, tasks=TASKS):
    """(train, val, test) of the kinds `tasks`, deterministic for a seed; no val or test prompt ever
    appears in train. Training draws the kinds in turn: a kind listed k times is drawn k times as often.

    Test and validation prompts are drawn first, each distinct, and held out; training entries are
    drawn from everything else (a prompt may recur in train: addition has only 810 of them).
    The held-out prompts of the default kinds are always the default dataset's (drawn first, from
    the same stream, then filtered to `tasks`), so a run on a selection of kinds is tested on the
    very prompts a default run held out and never trains on them: scores before and after teaching
    a model a new kind are held-out scores of the same prompts. A kind outside TASKS gets as many
    test and validation prompts as the first default kind, drawn next.
    """
    unknown = [task for task in tasks if task not in KINDS]
    if unknown or not tasks:
        raise ValueError(f"unknown task kinds {unknown}; choose from: {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    held_out = set()
    test = _draw(n_test, TASKS, rng, held_out, unique=True)
    val = _draw(n_val, TASKS, rng, held_out, unique=True)
    new = [task for task in dict.fromkeys(tasks) if task not in TASKS]
    if new:
        test += _draw(len(new) * math.ceil(n_test / len(TASKS)), new, rng, held_out, unique=True)
        val += _draw(len(new) * math.ceil(n_val / len(TASKS)), new, rng, held_out, unique=True)
    test, val = ([entry for entry in split if entry["task"] in tasks] for split in (test, val))
    train = _draw(n_train, tasks, rng, held_out, unique=False)
    return train, val, test


def selected_kinds(data):
    """The task kinds a --data value names, in the turns training draws them: 'tasks' -> TASKS;
    'tasks:swapcase,add' -> ('swapcase', 'add'); 'tasks:swapcase*3,add' -> swapcase 3 times as often:
    ('swapcase', 'swapcase', 'swapcase', 'add'). None for anything else (a dataset file). An unknown
    kind, a kind named twice or a weight that is not a positive integer raises a one-line ValueError."""
    if data == "tasks":
        return TASKS
    if not data.startswith(DATA_PREFIX):
        return None
    turns, named = [], set()
    for item in data[len(DATA_PREFIX):].split(","):
        kind, _, weight = (part.strip() for part in item.partition("*"))
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r} in --data {data}; "
                             f"choose from: {', '.join(KINDS)}")
        if kind in named:
            raise ValueError(f"--data {data} names the task kind {kind} twice")
        if weight and not (weight.isdigit() and int(weight) > 0):
            raise ValueError(f"--data {data}: the weight of {kind} must be a positive integer, "
                             f"got {weight!r}")
        named.add(kind)
        turns += [kind] * int(weight or 1)
    return tuple(turns)


def exact_match_by_task(entries, responses):
    """(overall rate, {task: rate}) of responses equal to the expected output (a conversation's: its last
    reply), whitespace stripped."""
    hits = {}
    for entry, response in zip(entries, responses, strict=True):
        hits.setdefault(entry["task"], []).append(response.strip() == expected_reply(entry))
    per_task = {task: sum(h) / len(h) for task, h in sorted(hits.items())}
    overall = sum(sum(h) for h in hits.values()) / max(1, len(entries))
    return overall, per_task


def near_miss(entry, rng):
    """A wrong answer close to the entry's right one, drawn from `rng`: what a model that almost knows
    the task might say, as the rejected response of a preference pair (benchmarks/dpo_demo.py).
    Numbers (count, add) are off by one; a word has one letter replaced by another, or, if it has two
    different neighbours, those swapped (half the time): the mistakes a letter-reading model makes."""
    answer = expected_reply(entry)
    if answer.isdigit():
        wrong = int(answer) + (1 if answer == "0" or rng.random() < 0.5 else -1)
        return str(wrong)
    swappable = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    if swappable and rng.random() < 0.5:
        i = swappable[int(rng.integers(len(swappable)))]
        return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]
    i = int(rng.integers(len(answer)))
    alphabet = LETTERS.upper() if answer[i].isupper() else LETTERS
    other = alphabet.replace(answer[i], "")                       # every letter but the right one
    return answer[:i] + other[int(rng.integers(len(other)))] + answer[i + 1:]
