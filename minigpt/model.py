"""GPT-2: token and position embeddings, n_layers pre-LayerNorm transformer blocks, a tied output head.

    idx (B, T) -> wte[idx] + wpe[0..T-1] -> dropout -> Block x n_layers -> ln_f -> x @ wte^T
               -> logits (B, T, V)
    Block:  x = x + attn(ln_1(x));   x = x + mlp(ln_2(x))
    attn:   c_attn (C -> 3C: q, k, v) -> causal attention over NH heads -> c_proj (C -> C) -> dropout
    mlp:    c_fc (C -> 4C) -> GELU (tanh approximation) -> c_proj (4C -> C) -> dropout

Attributes carry GPT-2's names (wte, wpe, h.{i}.ln_1, h.{i}.attn.c_attn, ..., ln_f), so a Hugging Face
GPT-2 checkpoint loads by name alone. Dropout on the attention weights, which GPT-2 also has, is left
out: fine-tuning runs with drop_rate 0, and leaving it out keeps the attention op fused.
"""
import math
from dataclasses import dataclass

import numpy as np

from . import functional as F, losses
from .nn import Dropout, Embedding, LayerNorm, Linear, Module
from .tensor import Tensor

GPT2_PRESETS = {  # the four published GPT-2 sizes; every one has V = 50257 and context 1024
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),     # 124M parameters
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),   # 355M
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),    # 774M
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),       # 1558M
}


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"GPTConfig: emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        # Checked by type, since a config can come from a file's JSON, where "no" would count as true.
        if not isinstance(self.qkv_bias, (bool, np.bool_)):
            raise ValueError(f"GPTConfig.qkv_bias must be true or false, got {self.qkv_bias!r}")
        if (not isinstance(self.drop_rate, (int, float, np.floating)) or isinstance(self.drop_rate, bool)
                or not 0.0 <= self.drop_rate < 1.0):
            raise ValueError(f"GPTConfig.drop_rate must be a number in [0, 1), got {self.drop_rate!r}")

    @classmethod
    def preset(cls, name, **overrides):
        if name not in GPT2_PRESETS:
            raise ValueError(f"unknown GPT-2 model {name!r}; choose one of {', '.join(GPT2_PRESETS)}")
        return cls(**{**GPT2_PRESETS[name], **overrides})


def parameter_shapes(cfg):
    """(name, shape) of every parameter of GPTModel(cfg), in its order, without building the model.

    A generator, so a loader comparing a file's arrays with a config that claims a million layers stops
    at the first block the file lacks. tests/test_npz_safety.py checks it against GPTModel itself.
    """
    V, T, C = cfg.vocab_size, cfg.context_length, cfg.emb_dim
    yield from (("wte.weight", (V, C)), ("wpe.weight", (T, C)))
    for i in range(cfg.n_layers):
        yield from ((f"h.{i}.ln_1.weight", (C,)), (f"h.{i}.ln_1.bias", (C,)),
                    (f"h.{i}.attn.c_attn.weight", (C, 3 * C)))
        if cfg.qkv_bias:
            yield f"h.{i}.attn.c_attn.bias", (3 * C,)
        yield from ((f"h.{i}.attn.c_proj.weight", (C, C)), (f"h.{i}.attn.c_proj.bias", (C,)),
                    (f"h.{i}.ln_2.weight", (C,)), (f"h.{i}.ln_2.bias", (C,)),
                    (f"h.{i}.mlp.c_fc.weight", (C, 4 * C)), (f"h.{i}.mlp.c_fc.bias", (4 * C,)),
                    (f"h.{i}.mlp.c_proj.weight", (4 * C, C)), (f"h.{i}.mlp.c_proj.bias", (C,)))
    yield from (("ln_f.weight", (C,)), ("ln_f.bias", (C,)))


class CausalSelfAttention(Module):
    def __init__(self, cfg, rng, dropout_rng, dtype):
        C = cfg.emb_dim
        self.n_heads = cfg.n_heads
        self.c_attn = Linear(C, 3 * C, bias=cfg.qkv_bias, rng=rng, dtype=dtype)
        # GPT-2 scales the init of layers that write into the residual stream by 1/sqrt(2 * n_layers)
        self.c_proj = Linear(C, C, rng=rng, std=0.02 / math.sqrt(2 * cfg.n_layers), dtype=dtype)
        self.resid_dropout = Dropout(cfg.drop_rate, dropout_rng)

    def forward(self, x, kv_cache=None, layer=0, rows=None):
        qkv = self.c_attn(x)                                           # (B, T, C) -> (B, T, 3C)
        if kv_cache is None:
            y = F.causal_self_attention(qkv, self.n_heads)             # (B, T, C)
        else:
            y = Tensor(kv_cache.attend(layer, qkv.data, self.n_heads))
        if rows is not None:
            y = y.reshape(-1, y.shape[-1])[rows]                       # (N, C): only the rows asked for
        return self.resid_dropout(self.c_proj(y))                      # (B, T, C), or (N, C)


class MLP(Module):
    def __init__(self, cfg, rng, dropout_rng, dtype):
        C = cfg.emb_dim
        self.c_fc = Linear(C, 4 * C, rng=rng, dtype=dtype)
        self.c_proj = Linear(4 * C, C, rng=rng, std=0.02 / math.sqrt(2 * cfg.n_layers), dtype=dtype)
        self.dropout = Dropout(cfg.drop_rate, dropout_rng)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))        # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(Module):
    def __init__(self, cfg, rng, dropout_rng, dtype):
        self.ln_1 = LayerNorm(cfg.emb_dim, dtype=dtype)
        self.attn = CausalSelfAttention(cfg, rng, dropout_rng, dtype)
        self.ln_2 = LayerNorm(cfg.emb_dim, dtype=dtype)
        self.mlp = MLP(cfg, rng, dropout_rng, dtype)

    def forward(self, x, kv_cache=None, layer=0, rows=None):
        """x (B, T, C) -> (B, T, C); with rows (flat positions b*T + t), only those: (N, C).

        Attention mixes positions, so every position is still computed as a key and a value; after it,
        each position's output depends on that position alone, and rows leaves the others out.
        """
        y = self.attn(self.ln_1(x), kv_cache, layer, rows)            # (B, T, C), or (N, C)
        if rows is not None:
            x = x.reshape(-1, x.shape[-1])[rows]                       # (N, C)
        x = x + y
        return x + self.mlp(self.ln_2(x))                              # (B, T, C), or (N, C)


class KVCache:
    """Keys and values of every layer for the positions processed so far (generation only).

    keys[layer], values[layer]: (B, NH, max_length, hs); positions 0 .. length-1 are filled.
    pad (B,): how many positions at the start of each row are left padding, so prompts of different
    lengths share one batch: padding is never attended to, and a row's first real token has position 0.
    """

    def __init__(self, cfg, batch_size, max_length, dtype=np.float32, pad=None):
        shape = (cfg.n_layers, batch_size, cfg.n_heads, max_length, cfg.emb_dim // cfg.n_heads)
        self.keys = np.empty(shape, dtype=dtype)
        self.values = np.empty(shape, dtype=dtype)
        self.max_length = max_length
        self.length = 0
        self.pad = np.zeros(batch_size, dtype=np.int64) if pad is None else np.asarray(pad, dtype=np.int64)

    def truncate(self, length):
        """Forget every position from `length` on; the next tokens are stored from there (a chat whose
        history changed after its first `length` tokens keeps their keys and values)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"KVCache.truncate: {length} is not within the {self.length} cached positions")
        self.length = length

    def positions(self, T):
        """Position ids of the next T tokens: (T,) when no row is padded, else (B, T) counted per row."""
        positions = np.arange(self.length, self.length + T)                 # (T,)
        if not self.pad.any():
            return positions
        return np.maximum(positions[None, :] - self.pad[:, None], 0)        # (B, T); padding sits at 0

    def repeat_rows(self, repeats):
        """Repeat row b repeats[b] times ((B,) counts; B -> sum(repeats) rows), its padding with it: several
        continuations of one prompt then share the prompt's keys and values, computed once
        (multiple-choice scoring, minigpt/evaluate/multiple_choice.py)."""
        self.keys = np.repeat(self.keys, repeats, axis=1)
        self.values = np.repeat(self.values, repeats, axis=1)
        self.pad = np.repeat(self.pad, repeats)

    def attend(self, layer, qkv, n_heads):
        """Causal attention of the t newest positions, with the cache: an array (B, t, C), inference only.

        qkv (B, t, 3C) holds positions length .. length+t-1; their keys and values are stored at those
        places, then each query attends to every cached key up to itself except padding. A padded key
        gets a large finite negative score, not -inf: a padding query, which sees only padding, then
        averages finite values instead of producing 0/0 = nan, and a real query gives it weight exactly 0.
        """
        B, t, C3 = qkv.shape
        C, hs = C3 // 3, C3 // (3 * n_heads)
        q, k, v = F.split_heads(qkv, n_heads)                                # (B, NH, t, hs)
        start, end = self.length, self.length + t
        keys, values = self.keys[layer][:, :, :end], self.values[layer][:, :, :end]  # (B, NH, end, hs)
        keys[:, :, start:] = k
        values[:, :, start:] = v
        att = q @ keys.transpose(0, 1, 3, 2)                                 # (B, NH, t, end)
        att *= 1.0 / math.sqrt(hs)
        if t > 1:                                                            # one new query sees every key
            att += F.causal_mask(t, end, att.dtype)
        if self.pad.any():
            is_padding = np.arange(end)[None, :] < self.pad[:, None]         # (B, end)
            att += np.where(is_padding, np.finfo(att.dtype).min, 0).astype(att.dtype)[:, None, None, :]
        F.softmax_rows_in_place(att)
        y = att @ values                                                     # (B, NH, t, hs)
        return y.transpose(0, 2, 1, 3).reshape(B, t, C)


class GPTModel(Module):
    def __init__(self, cfg, seed=0, dtype=np.float32):
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"GPTModel needs a GPTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        rng = np.random.default_rng(seed)                              # weight initialisation
        self.dropout_rng = np.random.default_rng(seed + 1)             # dropout masks; saved in checkpoints
        self.wte = Embedding(cfg.vocab_size, cfg.emb_dim, rng=rng, dtype=dtype)
        self.wpe = Embedding(cfg.context_length, cfg.emb_dim, rng=rng, std=0.01, dtype=dtype)
        self.drop = Dropout(cfg.drop_rate, self.dropout_rng)
        self.h = [Block(cfg, rng, self.dropout_rng, dtype) for _ in range(cfg.n_layers)]
        self.ln_f = LayerNorm(cfg.emb_dim, dtype=dtype)

    @property
    def dtype(self):
        return self.wte.weight.dtype

    def forward(self, idx, kv_cache=None, last_only=False):
        """Logits (B, T, V) for token ids idx (B, T); (B, 1, V) for the last position if last_only."""
        x = self.hidden_states(idx, kv_cache)                          # (B, T, C)
        if last_only:
            x = x[:, -1:]                                              # (B, 1, C)
        return F.lm_head(x, self.wte.weight)                           # (B, T, V)

    def hidden_states(self, idx, kv_cache=None, rows=None):
        """The final layer-normed activations (B, T, C), before the output head; with rows (flat positions
        b*T + t, increasing), only theirs, (N, C): the last block skips everything the others need not."""
        idx = self._check_ids(idx, start=kv_cache.length if kv_cache is not None else 0)
        B, T = idx.shape
        positions = np.arange(T) if kv_cache is None else kv_cache.positions(T)  # (T,), or (B, T) if padded
        x = self.drop(self.wte(idx) + self.wpe(positions))             # (B, T, C) + (T, C) -> (B, T, C)
        for layer, block in enumerate(self.h):
            x = block(x, kv_cache, layer, rows if layer == len(self.h) - 1 else None)
        if kv_cache is not None:
            kv_cache.length += T
        return self.ln_f(x)

    def loss(self, idx, targets, ignore_index=losses.IGNORE_INDEX):
        """Mean cross-entropy over the targets that are not ignore_index.

        Only the positions whose target counts reach the 50257-wide output head, the costliest layer,
        and the last block's attention projection and MLP: a padded or masked-prompt position matters
        to the loss only as a key and value of later positions, which the last block's attention uses.
        """
        targets = np.asarray(targets)
        if targets.shape != np.shape(idx):
            raise ValueError(f"targets have shape {targets.shape}, inputs have shape {np.shape(idx)}")
        kept = targets.reshape(-1) != ignore_index                     # (B*T,)
        if not kept.any() or kept.all():                               # nothing to leave out (or to learn:
            x = self.hidden_states(idx)                                # the loss op says so)  (B, T, C)
            return losses.lm_head_cross_entropy(x, self.wte.weight, targets, ignore_index)
        rows = np.flatnonzero(kept)                                    # (N,)
        x = self.hidden_states(idx, rows=rows)                         # (N, C)
        return losses.lm_head_cross_entropy(x, self.wte.weight, targets.reshape(-1)[rows], ignore_index)

    def _check_ids(self, idx, start=0):
        idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
        if idx.ndim != 2:
            raise ValueError(f"the model takes token ids of shape (batch, time), got shape {idx.shape}")
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {idx.dtype}")
        if start + idx.shape[1] > self.cfg.context_length:
            raise ValueError(f"sequence of {start + idx.shape[1]} tokens is longer than the model's context "
                             f"length {self.cfg.context_length}; crop or truncate it")
        if idx.size and (idx.min() < 0 or idx.max() >= self.cfg.vocab_size):
            bad = idx[(idx < 0) | (idx >= self.cfg.vocab_size)].flat[0]
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return idx

    def num_parameters(self):
        return sum(p.size for p in self.parameters())
