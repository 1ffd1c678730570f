"""LoRA in the fine-tuning pipeline (minigpt.finetune, `train.py --lora-rank R`).

A LoRA run freezes the model it starts from and trains the adapters of minigpt.lora alone: the
optimizer gets only A and B, so Adam's m and v exist only for them. Its run folder holds:

    adapters-final.npz, adapters-best.npz  A and B alone, with rank, alpha, the layers' names and what
                                           identifies the base (lora.save_adapters); the best ones are
                                           kept during training, so they survive a resume
    model-final.npz, model-best.npz        the base merged with them, W + (alpha / r) A B: a plain GPT-2
                                           for generate.py, `python -m minigpt.convert` and --export-hf
    checkpoint.npz                         as in any run, every weight (the frozen base too: a resume needs
                                           no other file) and Adam's state, which here is the adapters'

The test-set responses are generated with the merged weights: the same function as the LoRA layers,
to float32 rounding (tests/test_lora.py), at the base model's speed.
"""
from pathlib import Path

import numpy as np

from . import lora, weights
from .checkpoint import BestWeights

ADAPTERS_FINAL = "adapters-final.npz"
ADAPTERS_BEST = "adapters-best.npz"
MODEL_FINAL = "model-final.npz"
MODEL_BEST = "model-best.npz"
LORA_SEED_OFFSET = 2  # A is drawn with seed + 2 (the weights use the seed, dropout seed + 1)


def alpha(config):
    """The run's LoRA alpha: --lora-alpha, else the rank (a scale alpha / r of 1, as the reference's
    rank 16, alpha 16)."""
    return config.lora_alpha if config.lora_alpha is not None else config.lora_rank


def check_settings(config):
    """A ValueError naming the problem with the run's LoRA settings (none set is fine: LoRA is off)."""
    if config.lora_rank is None:
        if config.lora_alpha is not None:
            raise ValueError("lora_alpha is set but LoRA is off: give lora_rank too")
        return
    lora.check_hyperparameters(config.lora_rank, alpha(config))


def apply_to_run(model, config):
    """Apply LoRA to `model` as the RunConfig says -> its LoRAConfig; None when LoRA is off."""
    if config.lora_rank is None:
        return None
    rng = np.random.default_rng(config.seed + LORA_SEED_OFFSET)
    return lora.apply_lora(model, config.lora_rank, alpha(config), rng=rng)


def describe(model):
    """The run summary's LoRA line."""
    config = lora.lora_config(model)
    kinds = sorted({layer.split(".", 2)[-1] for layer in config.layers})
    return (f"LoRA: rank {config.rank}, alpha {config.alpha:g} (scale {config.scale:g}) on "
            f"{len(config.layers)} layers ({', '.join(kinds)}), the rest frozen; {lora.describe(model)}")


def best_keeper(run_dir, lora_config):
    """What keeps a run's best weights: model-best.npz, or in a LoRA run adapters-best.npz alone."""
    if lora_config is None:
        return BestWeights(Path(run_dir) / MODEL_BEST)
    return BestAdapters(Path(run_dir) / ADAPTERS_BEST)


class BestAdapters:
    """training.train's keeper of the best weights in a LoRA run: only A and B ever change, so only
    they are written (to `path`, a small .npz) and put back."""

    def __init__(self, path):
        self.path = Path(path)

    def save(self, model):
        lora.save_adapters(model, self.path)

    def restore(self, model):
        lora.copy_adapters(model, self.path)


def write_weights(run_dir, model):
    """At the end of a LoRA run, write adapters-final.npz, model-best.npz (the base merged with the
    best adapters) and model-final.npz (merged with the final ones), and leave `model` merged, for
    the export and the test responses. Returns metrics.json's "lora" entry: rank, alpha, layers,
    trainable numbers and the adapters' file size against the merged model's."""
    run_dir = Path(run_dir)
    config = lora.lora_config(model)
    entry = {"rank": config.rank, "alpha": config.alpha, "layers": list(config.layers),
             "trainable_parameters": sum(p.size for p in model.parameters(trainable_only=True)),
             "parameters": sum(p.size for p in model.parameters())}
    lora.save_adapters(model, run_dir / ADAPTERS_FINAL)
    lora.copy_adapters(model, run_dir / ADAPTERS_BEST)
    weights.save_npz(lora.merge_lora(model), run_dir / MODEL_BEST)
    lora.copy_adapters(lora.unmerge_lora(model), run_dir / ADAPTERS_FINAL)
    weights.save_npz(lora.merge_lora(model), run_dir / MODEL_FINAL)
    entry.update(adapters_bytes=(run_dir / ADAPTERS_FINAL).stat().st_size,
                 model_bytes=(run_dir / MODEL_FINAL).stat().st_size)
    return entry


def format_sizes(entry):
    """'adapters-final.npz: 0.11 MB, against 3.35 MB for model-final.npz (3.3%)'."""
    adapters, model = entry["adapters_bytes"], entry["model_bytes"]
    return (f"{ADAPTERS_FINAL}: {adapters / 1e6:.2f} MB, against {model / 1e6:.2f} MB for {MODEL_FINAL} "
            f"({100 * adapters / model:.1f}%)")
