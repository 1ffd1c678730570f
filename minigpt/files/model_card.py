"""How to talk to a model: the card every model file minigpt writes carries, its tokenizer and its template.

    card = make_card("byte", "chat")   # {"format", "tokenizer", "prompt_style", "template": {its texts}}
    save_npz(model, "model.npz", card) # a .npz keeps it in its __card__ entry (files.weights)
    read_card("model.npz")             # -> the card, or None for a file written before cards existed

A model is trained on token ids of one tokenizer, in the text of one prompt template; given another, it
reads nonsense without a word. So the card goes wherever the weights go: the run's model-*.npz files, its
checkpoint (whose run settings hold both), and a Hugging Face export (config.json's "minigpt" entry).
"template" holds the template's texts as they were when the model was trained, for tools other than
minigpt (minigpt itself goes by the name).
"""
from pathlib import Path

from ..prompts import CHAT_TEMPLATES, INSTRUCTION_STYLES, PROMPT_STYLES
from ..tokenizer import TOKENIZERS
from .fileio import BadFileError
from .weights import read_npz_card

CARD_FORMAT = "minigpt-card-1"
RUN_MODEL_FILE = "model-final.npz"  # what a run folder's card and weights are read from


def make_card(tokenizer, prompt_style):
    """The card of a model trained with `tokenizer` ("byte", "gpt2") on `prompt_style`'s text."""
    texts = (INSTRUCTION_STYLES.get(prompt_style) or CHAT_TEMPLATES[prompt_style])._asdict()
    return {"format": CARD_FORMAT, "tokenizer": tokenizer, "prompt_style": prompt_style, "template": texts}


def check_card(card, source):
    """`card` if it is a card this minigpt can use, else a one-line BadFileError naming `source`."""
    if not (isinstance(card, dict) and card.get("format") == CARD_FORMAT):
        raise BadFileError(f"{source}: its model card is not {CARD_FORMAT}")
    for key, known in (("tokenizer", TOKENIZERS), ("prompt_style", PROMPT_STYLES)):
        if card.get(key) not in known:
            raise BadFileError(f"{source}: its model card names the {key} {card.get(key)!r}, which this "
                               f"minigpt does not know ({', '.join(known)})")
    return card


def model_file(path):
    """The weights file a path names: the file itself, or a run folder's model-final.npz."""
    path = Path(path)
    if path.is_dir() and (path / RUN_MODEL_FILE).is_file():
        return path / RUN_MODEL_FILE
    return path


def read_card(path):
    """The card of a model file (.npz) or run folder; None when the file was written before cards existed
    (the caller then asks for the tokenizer and template with one line)."""
    path = model_file(path)
    if path.suffix == ".npz":
        card = read_npz_card(path)
        return None if card is None else check_card(card, path)
    return None
