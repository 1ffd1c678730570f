"""Compare two run folders: are their weights, metrics and histories the same? Prints figures; not a test.

    python benchmarks/compare_runs.py runs/before runs/after

What a change that should not change behaviour must leave as it was: for the same settings and seed,
the weight files hold the same arrays bit for bit, and metrics.json and history.json are equal (the
run folder's own name aside). Each file gets one line: "same", or what differs and by how much.
Exit code 0 when everything compared is the same, 1 otherwise, 2 for a folder that is not a run.
"""
import argparse
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

WEIGHT_FILES = ("model-final.npz", "model-best.npz", "adapters-final.npz", "adapters-best.npz")
JSON_FILES = ("metrics.json", "history.json", "test-responses.json")
CARD_KEY = "__card__"  # minigpt.files.weights.CARD_KEY (this script reads run folders without minigpt)


def compare_arrays(a_path, b_path):
    """'same', or the first entry that differs and its largest absolute difference. The model card
    (__card__: how to talk to the model, what data it learned) is compared last and apart, so a run
    of a minigpt that writes another card still shows whether its weights are the same."""
    with np.load(a_path) as a, np.load(b_path) as b:
        names = [set(archive.files) - {CARD_KEY} for archive in (a, b)]
        if names[0] != names[1]:
            return f"different entries: {sorted(names[0] ^ names[1])[:3]}"
        for name in sorted(names[0]):
            x, y = a[name], b[name]
            if x.dtype != y.dtype or x.shape != y.shape:
                return f"{name}: {x.dtype} {x.shape} against {y.dtype} {y.shape}"
            if not np.array_equal(x, y):
                floats = x.dtype.kind == "f"
                diff = np.abs(x.astype(np.float64) - y.astype(np.float64)).max() if floats else "?"
                return f"{name} differs (largest difference {diff})"
        cards = [str(archive[CARD_KEY]) if CARD_KEY in archive.files else None for archive in (a, b)]
    return "same" if cards[0] == cards[1] else "same weights; the model cards differ"


def compare_json(a_path, b_path):
    a, b = (json.loads(Path(path).read_text()) for path in (a_path, b_path))
    if a == b:
        return "same"
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))
        return f"differs in {', '.join(keys[:5])}"
    return "differs"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    for folder in (args.before, args.after):
        if not (folder / "metrics.json").is_file():
            print(f"error: {folder} is not a finished run folder (no metrics.json)", file=sys.stderr)
            return 2
    all_same = True
    for name in WEIGHT_FILES + JSON_FILES:
        a_path, b_path = args.before / name, args.after / name
        if not a_path.is_file() and not b_path.is_file():
            continue
        if not (a_path.is_file() and b_path.is_file()):
            verdict = "only in one folder"
        elif name.endswith(".npz"):
            try:
                verdict = compare_arrays(a_path, b_path)
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                verdict = f"unreadable ({e})"
        else:
            verdict = compare_json(a_path, b_path)
        all_same &= verdict.startswith("same")  # the weights: a new model card changes no result
        print(f"{name:<22} {verdict}")
    print("the runs are the same" if all_same else "the runs differ")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
