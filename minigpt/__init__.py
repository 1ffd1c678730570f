"""minigpt: GPT-2 from scratch in pure NumPy — autograd, hand-derived gradients, real GPT-2 weights,
instruction fine-tuning on a CPU."""
from .cpu import allocator  # noqa: F401  (first: it keeps freed memory for the next step)
from . import functional, losses, nn, optim
from .losses import IGNORE_INDEX, cross_entropy
from .generation import generate
from .gradcheck import GradcheckError, gradcheck
from .model import GPT2_PRESETS, GPTConfig, GPTModel, KVCache
from .tensor import Tensor, is_grad_enabled, no_grad

__all__ = ["Tensor", "no_grad", "is_grad_enabled", "cross_entropy", "IGNORE_INDEX", "gradcheck",
           "GradcheckError", "GPTConfig", "GPTModel", "GPT2_PRESETS", "KVCache", "generate",
           "functional", "losses", "nn", "optim"]


def __getattr__(name):
    # Weight loading is imported on first use, so `import minigpt` stays light.
    if name in ("load_hf_gpt2", "save_hf_gpt2", "load_weights", "save_weights", "pretrained_gpt2"):
        from .files import weights
        return getattr(weights, name)
    raise AttributeError(f"module 'minigpt' has no attribute {name!r}")
