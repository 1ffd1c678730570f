"""The built-in tasks as a multiple-choice benchmark: each test prompt's right answer among near misses.

The offline demonstration of log-likelihood scoring (docs/evaluation.md): `python train.py`'s model is
asked its own test prompts (minigpt/tasks.py), each with four choices, the right answer and three near
misses (tasks.near_miss: a letter replaced or two swapped, a number off by one), in a shuffled order:

  cloze    context: the prompt exactly as fine-tuning showed it (prompts.build_prompt, the run's style);
           continuations: the four answers, right after the response header (no delimiter). This asks
           what the model learned: which answer it finds likeliest.
  letter   context: MMLU's letter layout (mmlu.render_letter) of "{instruction}\\n{input}", the four
           answers listed as A-D, ending "Answer:"; continuations " A" ... " D". A model fine-tuned on
           the tasks never saw this layout, nor a letter as an answer.

(The letter layout leaves out the prompt template: with it, the listed answers would not fit the default
model's 64-token context.) k examples (from the validation split) may come first, as MMLU's do.
"""
import numpy as np

from ..prompts import build_prompt
from ..tasks import near_miss
from .mmlu import LETTERS, render_letter
from .multiple_choice import Question

FORMATS = ("cloze", "letter")
N_CHOICES = 4


def near_misses(entry, rng, n=N_CHOICES - 1):
    """n different wrong answers near the entry's right one: tasks.near_miss of the answer or of a near
    miss drawn before (a number off by one has only two neighbours; their neighbours are near too)."""
    answer = entry["output"]
    wrong = []
    for _ in range(1000):
        if len(wrong) == n:
            return wrong
        start = [answer, *wrong][int(rng.integers(len(wrong) + 1))]
        candidate = near_miss(dict(entry, output=start), rng)
        if candidate != answer and candidate not in wrong:
            wrong.append(candidate)
    raise ValueError(f"no {n} different near misses of {answer!r}")


def task_question(entry, choices, answer, form, style="phi3", shots=()):
    """A Question of one task entry with its `choices` (the right one at index `answer`) in `form`;
    `shots`: solved (entry, choices, answer) examples shown first, each followed by a blank line."""
    if form == "cloze":
        examples = "".join(f"{build_prompt(e, style)}{c[a]}\n\n" for e, c, a in shots)
        return Question(examples + build_prompt(entry, style), tuple(choices), answer, delimiter="",
                        group=entry.get("task", ""))
    if form == "letter":
        examples = "".join(f"{_letter_context(e, c)} {LETTERS[a]}\n\n" for e, c, a in shots)
        return Question(examples + _letter_context(entry, choices), tuple(LETTERS[:len(choices)]), answer,
                        group=entry.get("task", ""))
    raise ValueError(f"unknown format {form!r} for the tasks benchmark; choose from: {', '.join(FORMATS)}")


def _letter_context(entry, choices):
    return render_letter(f"{entry['instruction']}\n{entry['input']}", choices)


def with_choices(entries, seed):
    """(entry, choices, index of the right one) for each entry: the answer and its near misses, shuffled;
    the same for a seed."""
    rng = np.random.default_rng(seed)
    drawn = []
    for entry in entries:
        choices = [entry["output"], *near_misses(entry, rng)]
        order = rng.permutation(len(choices))
        drawn.append(([choices[i] for i in order], int(np.flatnonzero(order == 0)[0])))
    return [(entry, choices, answer) for entry, (choices, answer) in zip(entries, drawn)]


def task_questions(entries, form="cloze", style="phi3", k=0, shot_entries=(), seed=0):
    """The multiple-choice Questions of task `entries`, each after the first k of `shot_entries` that
    are not the question's own prompt."""
    pool = with_choices(shot_entries, seed + 1) if k else []
    questions = []
    for entry, choices, answer in with_choices(entries, seed):
        prompt = (entry["instruction"], entry["input"])
        shots = [shot for shot in pool if (shot[0]["instruction"], shot[0]["input"]) != prompt][:k]
        if len(shots) < k:
            raise ValueError(f"{len(shots)} examples to show, fewer than the {k} asked for")
        questions.append(task_question(entry, choices, answer, form, style, shots))
    return questions
