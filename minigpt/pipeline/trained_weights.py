"""What a run trains of its model, and which weight files it keeps: every weight, or LoRA adapters alone.

    weights = trained_weights.prepare(model, run_dir, lora_rank, lora_alpha, seed)   # applies LoRA if asked
    training.train(..., best=weights.best)      # keeps the best weights during training
    weights.write_final(model, log)             # the final weight files -> metrics.json's "lora" entry

Full fine-tuning (AllWeights) keeps model-best.npz during training and writes model-final.npz at the end.
A LoRA run (LoRAAdapters) freezes the model it starts from and trains the adapters of minigpt.lora
alone: the optimizer gets only A and B, so Adam's m and v exist only for them. Its run folder holds:

    adapters-final.npz, adapters-best.npz  A and B alone, with rank, alpha, the layers' names and what
                                           identifies the base (minigpt.files.adapters); the best ones
                                           are kept during training, so they survive a resume
    model-final.npz, model-best.npz        the base merged with them, W + (alpha / r) A B: a plain GPT-2
                                           for generate.py, `python -m minigpt.files.convert` and --export-hf
    checkpoint.npz                         as in any run, every weight (the frozen base too: a resume needs
                                           no other file) and Adam's state, which here is the adapters'

A LoRA run's test-set responses are generated with the merged weights: the same function as the LoRA
layers, to float32 rounding (tests/test_lora.py), at the base model's speed.
"""
from pathlib import Path

import numpy as np

from .. import lora
from ..files import adapters
from ..files.checkpoint import BestWeightsFile
from ..files.weights import save_npz

ADAPTERS_FINAL = "adapters-final.npz"
ADAPTERS_BEST = "adapters-best.npz"
MODEL_FINAL = "model-final.npz"
MODEL_BEST = "model-best.npz"
LORA_SEED_OFFSET = 2  # A is drawn with seed + 2 (the weights use the seed, dropout seed + 1)


def prepare(model, run_dir, card, lora_rank=None, lora_alpha=None, seed=0):
    """What trains in `model`: AllWeights, or with `lora_rank` LoRA adapters of rank lora_rank and
    `lora_alpha`, applied to the model here (A drawn with seed + LORA_SEED_OFFSET). Every model file
    written carries `card` (files.model_card: the tokenizer and the template)."""
    if lora_rank is None:
        return AllWeights(run_dir, card)
    lora.apply_lora(model, lora_rank, lora_alpha, rng=np.random.default_rng(seed + LORA_SEED_OFFSET))
    return LoRAAdapters(run_dir, card, lora_alpha)


class AllWeights:
    """Full fine-tuning: every weight trains, and the run keeps model-best.npz and model-final.npz."""
    suspects = ()  # settings of its own that can make training diverge (training.train's suspects)

    def __init__(self, run_dir, card):
        self.run_dir, self.card = Path(run_dir), card
        self.best = BestWeightsFile(self.run_dir / MODEL_BEST, card)

    def summary(self, model):
        """The run summary's line on what trains (None: nothing to add, every weight trains)."""
        return None

    def write_final(self, model, log=print):
        """Write model-final.npz; returns metrics.json's "lora" entry, None."""
        save_npz(model, self.run_dir / MODEL_FINAL, self.card)
        return None


class LoRAAdapters:
    """A LoRA run: only the adapters train, and the run keeps them alone besides the merged model."""

    def __init__(self, run_dir, card, alpha):
        self.run_dir, self.card = Path(run_dir), card
        self.best = BestAdapters(self.run_dir / ADAPTERS_BEST)
        self.suspects = (f"--lora-alpha (now {alpha:g})",)  # a large scale can make training diverge

    def summary(self, model):
        """The run summary's LoRA line: 'LoRA: rank 16, alpha 16 (scale 1) on 48 layers (attn.c_attn, ...),
        the rest frozen; trainable ...'."""
        config = lora.lora_config(model)
        kinds = sorted({layer.split(".", 2)[-1] for layer in config.layers})
        return (f"LoRA: rank {config.rank}, alpha {config.alpha:g} (scale {config.scale:g}) on "
                f"{len(config.layers)} layers ({', '.join(kinds)}), the rest frozen; "
                f"{lora.trainable_summary(model)}")

    def write_final(self, model, log=print):
        """Write adapters-final.npz, model-best.npz (the base merged with the best adapters) and
        model-final.npz (merged with the final ones), and leave `model` merged, for the export and the
        test responses. Returns metrics.json's "lora" entry: rank, alpha, layers, trainable numbers
        and the adapters' file size against the merged model's."""
        run_dir = self.run_dir
        config = lora.lora_config(model)
        entry = {"rank": config.rank, "alpha": config.alpha, "layers": list(config.layers),
                 "trainable_parameters": sum(p.size for p in model.parameters(trainable_only=True)),
                 "parameters": sum(p.size for p in model.parameters())}
        adapters.save_adapters(model, run_dir / ADAPTERS_FINAL)
        adapters.copy_adapters(model, run_dir / ADAPTERS_BEST)
        save_npz(lora.merge_lora(model), run_dir / MODEL_BEST, self.card)
        adapters.copy_adapters(lora.unmerge_lora(model), run_dir / ADAPTERS_FINAL)
        save_npz(lora.merge_lora(model), run_dir / MODEL_FINAL, self.card)
        entry.update(adapters_bytes=(run_dir / ADAPTERS_FINAL).stat().st_size,
                     model_bytes=(run_dir / MODEL_FINAL).stat().st_size)
        log(f"{ADAPTERS_FINAL}: {entry['adapters_bytes'] / 1e6:.2f} MB, against "
            f"{entry['model_bytes'] / 1e6:.2f} MB for {MODEL_FINAL} "
            f"({100 * entry['adapters_bytes'] / entry['model_bytes']:.1f}%)")
        return entry


class BestAdapters:
    """training.train's keeper of the best weights in a LoRA run: only A and B ever change, so only
    they are written (to `path`, a small .npz) and put back."""

    def __init__(self, path):
        self.path = Path(path)

    def save(self, model):
        adapters.save_adapters(model, self.path)

    def restore(self, model):
        adapters.copy_adapters(model, self.path)
