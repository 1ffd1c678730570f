"""HellaSwag (Zellers et al. 2019, https://arxiv.org/abs/1905.07830): pick the ending of a described scene.

The validation set of the original release, 10,042 questions of four endings, one JSON object a line
(https://github.com/rowanz/hellaswag, data/hellaswag_val.jsonl), is downloaded once into
data/hellaswag/; any file in that layout can be given instead. The fields used:

    {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "endings": [four strings], "label": 3,
     "source_id": "activitynet~v_-JhWjGDPHMY"}

Scored 0-shot as a cloze, each ending after the context with a space, in one of two renderings whose
published GPT-2 124M figures differ (docs/evaluation.md):

  harness   lm-evaluation-harness's `hellaswag`: context preprocess(activity_label + ": " + ctx_a + " " +
            ctx_b.capitalize()), endings preprocess(ending); preprocess strips the text, turns " [title]"
            into ". ", drops other [bracketed] WikiHow markers and double spaces (acc 0.2892, acc_norm 0.3114)
  llmc      llm.c's dev/data/hellaswag.py: context ctx and the endings as they are (acc 0.2859, acc_norm
            0.2955, which is acc_norm_tokens here)

Questions are grouped by their source, ActivityNet or WikiHow.
"""
import json
import re
from pathlib import Path

from ..files.fileio import download_file
from .multiple_choice import Question

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FORMATS = ("harness", "llmc")
FIELDS = {"activity_label": str, "ctx_a": str, "ctx_b": str, "ctx": str, "endings": list, "label": int}


def hellaswag_file(data_dir="data"):
    """data_dir/hellaswag/hellaswag_val.jsonl, downloaded on first use (11 MB)."""
    path = Path(data_dir) / "hellaswag" / "hellaswag_val.jsonl"
    if not path.is_file():
        download_file(HELLASWAG_URL, path, hint="Pass --data PATH with a local copy of hellaswag_val.jsonl "
                                                "instead.")
    return path


def read_examples(path):
    """The examples of a HellaSwag .jsonl file, each checked for the fields used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HellaSwag file not found: {path}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}: line {line_number} is not JSON ({e})") from None
            problem = _problem(example)
            if problem:
                raise ValueError(f"{path}: line {line_number} is not a HellaSwag example: {problem}")
            examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def _problem(example):
    if not isinstance(example, dict):
        return f"expected an object, got {type(example).__name__}"
    for field, kind in FIELDS.items():
        if not isinstance(example.get(field), kind) or isinstance(example.get(field), bool):
            return f"{field!r} must be a {kind.__name__}"
    endings = example["endings"]
    if not endings or not all(isinstance(ending, str) for ending in endings):
        return "'endings' must be a list of strings"
    if not 0 <= example["label"] < len(endings):
        return f"'label' {example['label']} is not the index of an ending"
    return None


def preprocess(text):
    """lm-evaluation-harness's clean-up of HellaSwag's text (WikiHow's [title]-style markers)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_question(example, form="harness"):
    """A Question of one example, in the rendering `form` ("harness" or "llmc")."""
    source = example.get("source_id", "").split("~")[0] or "unknown source"
    if form == "harness":
        context = f"{example['activity_label']}: {example['ctx_a']} {example['ctx_b'].capitalize()}"
        endings = tuple(preprocess(ending) for ending in example["endings"])
        return Question(preprocess(context), endings, example["label"], group=source)
    if form == "llmc":
        return Question(example["ctx"], tuple(example["endings"]), example["label"], group=source)
    raise ValueError(f"unknown HellaSwag rendering {form!r}; choose from: {', '.join(FORMATS)}")


def hellaswag_questions(path, form="harness", k=0):
    """Every example of the file at `path` as a Question; HellaSwag is scored 0-shot here, as published."""
    if k:
        raise ValueError("HellaSwag is scored 0-shot (its published figures are); use --shots 0")
    return [hellaswag_question(example, form) for example in read_examples(path)]
