"""Convert GPT-2 weights between Hugging Face's safetensors layout and minigpt's .npz.

    python -m minigpt.files.convert data/gpt2-small/model.safetensors data/gpt2-small.npz
    python -m minigpt.files.convert runs/finetuned.npz export/    # model.safetensors + config.json

The output of the second command loads in transformers with GPT2LMHeadModel.from_pretrained("export").
A bad input ends the program with one line `error: ...` on stderr and exit code 2.
"""
import argparse
import sys

from .fileio import BadFileError
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
                             "(Hugging Face model.safetensors + config.json)")
    args = parser.parse_args(argv)
    try:
        weights_format(args.output)  # reject an unwritable OUT before loading a large IN
        model = load_weights(args.input)
        written = save_weights(model, args.output)
    except (BadFileError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message
        print(f"error: {message}", file=sys.stderr)
        return 2
    cfg = model.cfg
    print(f"wrote {written} ({cfg.n_layers} layers, emb_dim {cfg.emb_dim}, {cfg.n_heads} heads, "
          f"vocab {cfg.vocab_size}, context {cfg.context_length})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
