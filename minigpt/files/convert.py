"""Convert GPT-2 weights between Hugging Face's safetensors layout and minigpt's .npz.

    python -m minigpt.files.convert data/gpt2-small/model.safetensors data/gpt2-small.npz
    python -m minigpt.files.convert runs/finetuned.npz export/    # model.safetensors + config.json

The output of the second command loads in transformers with GPT2LMHeadModel.from_pretrained("export").
A model card (files.model_card: the tokenizer and the template the model was trained with) goes along
either way; a Hugging Face folder made from a file with a card also gets the tokenizer files and the chat
template (files.hf_tokenizer), so AutoTokenizer.from_pretrained("export") talks to the model as minigpt
does (GPT-2's tokenizer is built offline from --vocab-dir, or from tiktoken's cache or download).
A bad input ends the program with one line `error: ...` on stderr and exit code 2.
"""
import argparse
import sys

from ..tokenizer import VOCAB_DIR_ENV, get_tokenizer
from .fileio import BadFileError
from .model_card import read_card
from .weights import load_weights, save_weights, weights_format


def main(argv=None):
    """Run the converter on `argv` (default: sys.argv[1:]) -> process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m minigpt.files.convert",
        description="Convert GPT-2 weights between Hugging Face safetensors and minigpt's .npz.")
    parser.add_argument("input", metavar="IN",
                        help="a Hugging Face model.safetensors, a directory holding one (with its "
                             "config.json), or a minigpt .npz")
    parser.add_argument("output", metavar="OUT",
                        help="a path ending in .npz (minigpt), or a directory or .safetensors path "
                             "(Hugging Face model.safetensors + config.json, and the tokenizer files)")
    parser.add_argument("--vocab-dir", metavar="DIR",
                        help=f"folder with GPT-2's encoder.json and vocab.bpe, for the tokenizer files of a "
                             f"model with GPT-2's tokenizer, offline (or set {VOCAB_DIR_ENV})")
    args = parser.parse_args(argv)
    try:
        to_hf = weights_format(args.output) == "hf"  # reject an unwritable OUT before loading a large IN
        card = read_card(args.input)
        model = load_weights(args.input)
        tokenizer = get_tokenizer(card["tokenizer"], args.vocab_dir) if card and to_hf else None
        written = save_weights(model, args.output, card, tokenizer)
    except (BadFileError, OSError, ValueError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message
        print(f"error: {message}", file=sys.stderr)
        return 2
    cfg = model.cfg
    talk = "" if card is None else f", {card['tokenizer']} tokenizer, {card['prompt_style']} template"
    print(f"wrote {written} ({cfg.n_layers} layers, emb_dim {cfg.emb_dim}, {cfg.n_heads} heads, "
          f"vocab {cfg.vocab_size}, context {cfg.context_length}{talk})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
