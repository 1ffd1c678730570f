"""GPT-2 in plain PyTorch eager: the reference model that benchmarks/bench.py times minigpt against.

The same architecture as minigpt.model.GPTModel, written the way a PyTorch user would:
    idx (B, T) -> wte[idx] + wpe[0..T-1] -> Block x n_layers -> ln_f -> x @ wte^T -> logits (B, T, V)
    Block:  x = x + attn(ln_1(x));   x = x + mlp(ln_2(x))          (pre-LayerNorm)
    attn:   fused c_attn (C -> 3C) -> F.scaled_dot_product_attention(is_causal=True) -> c_proj
    mlp:    c_fc (C -> 4C) -> GELU (tanh approximation) -> c_proj (4C -> C)
No dropout (the benchmark runs with drop_rate 0), float32, GPT-2's initialisation (normal, std 0.02;
zero biases), so the loss at initialisation is about ln(V) as in minigpt. Attention uses PyTorch's
fused SDPA kernel, not a masked softmax.

LoRA (lora_rank=r): every weight frozen (requires_grad=False) and each block linear wrapped in
LoRALinear, a frozen nn.Linear plus trainable lora_A, lora_B Parameters, the way PyTorch users write it.

Letters: B batch, T time, C emb_dim, V vocab_size, NH n_heads, hs = C / NH, r the LoRA rank.
Only benchmarks import this file, and only when torch is installed.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


class LoRALinear(nn.Module):
    """out = base(x) + (alpha / r) (x @ lora_A) @ lora_B, base frozen; lora_A uniform in +-1/sqrt(C)
    (nn.Linear's default), lora_B zeros, as minigpt.lora.LoRALinear."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        bound = 1 / math.sqrt(base.in_features)
        self.lora_A = nn.Parameter(torch.empty(base.in_features, rank).uniform_(-bound, bound))  # (C, r)
        self.lora_B = nn.Parameter(torch.zeros(rank, base.out_features))                          # (r, OC)

    def forward(self, x):
        return self.base(x) + self.scale * ((x @ self.lora_A) @ self.lora_B)    # (B, T, C) -> (B, T, OC)


class CausalSelfAttention(nn.Module):
    def __init__(self, emb_dim, n_heads, qkv_bias=True):
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(emb_dim, 3 * emb_dim, bias=qkv_bias)
        self.c_proj = nn.Linear(emb_dim, emb_dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                                # (B, T, 3C) -> 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, NH, T, hs)
                   for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)            # (B, NH, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                        # (B, T, C)
        return self.c_proj(y)                                                   # (B, T, C)


class MLP(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.c_fc = nn.Linear(emb_dim, 4 * emb_dim)
        self.c_proj = nn.Linear(4 * emb_dim, emb_dim)

    def forward(self, x):
        h = F.gelu(self.c_fc(x), approximate="tanh")                            # (B, T, C) -> (B, T, 4C)
        return self.c_proj(h)                                                   # (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, emb_dim, n_heads, qkv_bias=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(emb_dim)
        self.attn = CausalSelfAttention(emb_dim, n_heads, qkv_bias)
        self.ln_2 = nn.LayerNorm(emb_dim)
        self.mlp = MLP(emb_dim)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))                                         # (B, T, C)
        return x + self.mlp(self.ln_2(x))                                       # (B, T, C)


class TorchGPT2(nn.Module):
    """GPT-2 with a tied output head; takes the fields of a minigpt GPTConfig (and optionally LoRA's)."""

    def __init__(self, vocab_size, context_length, emb_dim, n_heads, n_layers, qkv_bias=True, lora_rank=None,
                 lora_alpha=None):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, emb_dim)
        self.wpe = nn.Embedding(context_length, emb_dim)
        self.h = nn.ModuleList(Block(emb_dim, n_heads, qkv_bias) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(emb_dim)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if lora_rank is not None:
            self.requires_grad_(False)
            alpha = lora_alpha if lora_alpha is not None else lora_rank
            for block in self.h:
                for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                                     (block.mlp, "c_proj")):
                    setattr(parent, name, LoRALinear(getattr(parent, name), lora_rank, alpha))

    def hidden_states(self, idx):
        T = idx.shape[1]
        positions = torch.arange(T, device=idx.device)                          # (T,)
        x = self.wte(idx) + self.wpe(positions)                                 # (B, T, C) + (T, C)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)                                                     # (B, T, C)

    def forward(self, idx):
        return F.linear(self.hidden_states(idx), self.wte.weight)              # (B, T, C) -> (B, T, V)

    def loss(self, idx, targets, head="full"):
        """Mean cross-entropy over targets != IGNORE_INDEX.

        head="full": logits at every position, then cross_entropy(ignore_index) -- the usual PyTorch
        code (and the reference pipeline's). head="kept": the output head runs only on the positions
        whose target counts, as minigpt's GPTModel.loss does.
        """
        if head == "full":
            logits = self(idx)                                                  # (B, T, V)
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        if head != "kept":
            raise ValueError(f"head must be 'full' or 'kept', got {head!r}")
        x = self.hidden_states(idx).flatten(0, 1)                               # (B*T, C)
        keep = targets.flatten() != IGNORE_INDEX                                # (B*T,)
        logits = F.linear(x[keep], self.wte.weight)                             # (N, V), N = kept targets
        return F.cross_entropy(logits, targets.flatten()[keep])
