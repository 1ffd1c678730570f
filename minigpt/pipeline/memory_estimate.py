"""A run's peak memory, estimated from the model's configuration before anything is allocated.

    job = Job(GPTConfig.preset("gpt2-large"), batch_size=8, length=91)
    estimate = estimate_memory(job)
    estimate.peak, estimate.phase         # bytes at the peak, and when: "a training step", ...
    estimate_memory(dataclasses.replace(job, lora_rank=16)).peak      # the same run with LoRA

Every array is float32, 4 bytes a number. With P parameters, of which P_train train (all of them, or
LoRA's adapters alone), a run holds the weights (P) and, once training starts, Adam's m and v (2 P_train)
and a gradient for each trained parameter (P_train). A training step adds the activations its backward
pass needs, counted here per position (one row of the batch at one time step) from the Cache sections of
the ops (minigpt/functional.py, minigpt/losses.py, minigpt/lora.py, minigpt/dpo.py):

    every op's output, held by the recorded graph until backward() returns      per block 18 C
        ln_1 C, c_attn 3C, attention C, c_proj C, residual C, ln_2 C, c_fc 4C, GELU 4C, c_proj C, residual C
        (+ 2C with dropout: two outputs); outside the blocks the embeddings' sum, wte's rows and ln_f: 3 C,
        and wpe's rows once (T C)
    what the backward closures cache, freed as the backward pass goes down    per block 6 C + NH T + 2
        ln_1's and ln_2's xhat 2C and rstd 2, GELU's tanh 4C, the attention weights NH T
        (+ 2C with dropout: two masks; + 4 r with LoRA: x A of its four layers); ln_f's xhat C + 1
    the loss: the logits of each target that counts (V each, overwritten by their gradient), and their
        rows' gradient dx (C each)

Live memory peaks at one end of the backward pass: its start (all of the above) or its end (the outputs
and every gradient); tests/test_memory_estimate.py checks that against tracemalloc. Resident memory, what
the machine must have, holds both: the gradients, made as the pass goes down, are other sizes than the
caches it frees, and the allocator keeps freed memory for the next step (minigpt/cpu/allocator.py), so
they rarely land there. Measured on GPT-2's sizes, the peak is the sum, plus one op's temporaries
(TRANSIENT_PER_POSITION).

Other phases of a run can need more: loading (the new model's random initialisation draws float64
arrays), and after training, when the optimizer's state and the last gradients are still held (full
fine-tuning), LoRA's merged weights sit beside the base, --export-hf loads the best weights as a second
model, and the test responses need a KV cache. `peak` is the largest phase; BASELINE_BYTES (the
interpreter, NumPy, the tokenizer, the data) is counted in every one. A Hugging Face file is mapped
while it loads: its pages count in the process's resident size, but they are the page cache's, which
the system takes back when it needs them, so they are not counted. benchmarks/memory_estimate.py
measures the estimate against the peak resident memory of real runs (docs/memory.md).
"""
import dataclasses
import math
from typing import Optional

from ..files.fileio import format_bytes
from ..model import GPTConfig, parameter_shapes
from .responses import KV_CACHE_BYTES, MAX_BATCH

BYTES = 4                      # float32
BASELINE_BYTES = 120 * 10**6   # train.py with GPT-2's tokenizer and rasbt's data loaded: 0.09-0.11 GB
KEPT_PER_BLOCK = 18            # x C: every op's output in a block (see the module docstring)
CACHED_PER_BLOCK = 6           # x C: ln_1's and ln_2's xhat, GELU's tanh
TRANSIENT_PER_POSITION = 8     # x C: GELU's backward holds its gradient in and out, 4C each
# x V C, building a model's largest table: a float64 draw (2 float32s' worth), scaled into another (2),
# then the float32 table (1)
INIT_WORKSPACE = 5
LORA_TARGETS_PER_BLOCK = 12    # x C^2: the weights of c_attn (3C^2), c_proj (C^2), c_fc and mlp.c_proj (4C^2)
LORA_NUMBERS_PER_RANK = 16     # x C r per block: A and B of c_attn (C + 3C), c_proj (2C), c_fc, c_proj (5C)


@dataclasses.dataclass(frozen=True)
class Job:
    """What a run's memory depends on, known before its model is loaded."""
    cfg: GPTConfig
    batch_size: int
    length: int                        # positions of the longest batch: its longest sequence, cut
    lora_rank: Optional[int] = None    # None: full fine-tuning
    dropout: bool = False
    max_new_tokens: int = 0            # of the test responses
    export_hf: bool = False
    sequences_per_example: int = 1     # DPO: 2, the chosen and the rejected response of a pair
    targets: Optional[int] = None      # the most targets one sequence has (the loss's rows); None: length
    prompt_length: Optional[int] = None  # the longest prompt, for the test responses; None: length

    @property
    def rows(self):
        """Sequences in a training step."""
        return self.batch_size * self.sequences_per_example


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes, by what holds them; `phases` maps each phase of the run to its total."""
    weights: int
    gradients: int
    adam: int
    activations: int           # a training step's peak beyond the weights, gradients and Adam
    phases: dict

    @property
    def phase(self):
        """The phase that needs the most memory."""
        return max(self.phases, key=self.phases.get)

    @property
    def peak(self):
        return self.phases[self.phase]

    @property
    def step(self):
        return self.phases["a training step"]


def parameter_count(cfg):
    return sum(math.prod(shape) for _, shape in parameter_shapes(cfg))


def lora_parameter_count(cfg, rank):
    """Numbers in LoRA's A and B of rank `rank` on the four linear layers of every block."""
    return LORA_NUMBERS_PER_RANK * cfg.emb_dim * rank * cfg.n_layers


def activation_numbers(cfg, rows, length, lora_rank=None, dropout=False, targets=None):
    """(kept, cached, loss): numbers of a training step's forward pass on `rows` sequences of `length`
    positions, at most `targets` of them targets, that the backward pass needs: kept until it ends, freed
    as it goes down, and the loss's logits and dx."""
    C, H, L, V = cfg.emb_dim, cfg.n_heads, cfg.n_layers, cfg.vocab_size
    positions = rows * length
    dropout_sites = 2 if dropout else 0                            # per block: after attention, after the MLP
    kept = positions * (L * (KEPT_PER_BLOCK + dropout_sites) * C + 3 * C + dropout * C) + length * C
    per_block_cache = CACHED_PER_BLOCK * C + H * length + 2 + dropout_sites * C + 4 * (lora_rank or 0)
    cached = positions * (L * per_block_cache + C + 1 + dropout * C)
    loss_rows = rows * min(length, targets or length)
    return kept, cached, loss_rows * (V + C)


def sequence_sizes(sequences, prompt_lengths, mask_prompt, cut):
    """A Job's length, targets and prompt_length from the training sequences (token lists: prompt, response
    header and response) and their prompts' lengths (header included): the longest sequence, cut; the most
    targets one has (data.collate: its tokens and <|endoftext|>, less the prompt's when it is masked); the
    longest prompt."""
    length = min(cut, max(len(sequence) for sequence in sequences))
    targets = length
    if mask_prompt:
        targets = max(min(len(sequence), cut) - prompt + 1
                      for sequence, prompt in zip(sequences, prompt_lengths))
    return dict(length=length, targets=max(1, targets), prompt_length=max(prompt_lengths))


def estimate_memory(job):
    """The MemoryEstimate of the run `job` (a Job) describes."""
    cfg, lora_rank = job.cfg, job.lora_rank
    C, V = cfg.emb_dim, cfg.vocab_size
    n_params = parameter_count(cfg)
    if lora_rank:
        trained = lora_parameter_count(cfg, lora_rank)
        model_numbers = n_params + trained
        after_training = model_numbers + 3 * trained + LORA_TARGETS_PER_BLOCK * C * C * cfg.n_layers  # merged
    else:
        trained = n_params
        model_numbers = n_params
        after_training = 4 * n_params                              # weights, Adam's m and v, last gradients
    kept, cached, loss = activation_numbers(cfg, job.rows, job.length, lora_rank, job.dropout, job.targets)
    # beyond the gradients: the start of the backward pass, which they do not replace (the module docstring)
    activations = kept + cached + loss + TRANSIENT_PER_POSITION * C * job.rows * job.length
    building = n_params + INIT_WORKSPACE * V * C                   # the token embedding is the largest draw
    prompt_length = job.prompt_length or job.length
    generating = after_training + generation_numbers(cfg, prompt_length, job.max_new_tokens)
    exporting = after_training + building if job.export_hf else 0
    phases = {"loading the model": building,
              "a training step": model_numbers + 3 * trained + activations,
              "after training": max(generating, exporting)}
    return MemoryEstimate(weights=BYTES * model_numbers, gradients=BYTES * trained, adam=2 * BYTES * trained,
                          activations=BYTES * activations,
                          phases={name: BASELINE_BYTES + BYTES * numbers for name, numbers in phases.items()})


def generation_numbers(cfg, prompt_length, max_new_tokens):
    """Numbers the test responses add: the KV cache of a batch of the longest prompts (pipeline/responses.py
    caps it), and the forward pass over them."""
    C, L = cfg.emb_dim, cfg.n_layers
    positions = min(cfg.context_length, prompt_length + max_new_tokens)
    rows = max(1, min(MAX_BATCH, KV_CACHE_BYTES // (positions * L * C * 2 * BYTES)))
    kv_cache = rows * positions * L * C * 2
    forward = rows * prompt_length * (TRANSIENT_PER_POSITION * C + cfg.n_heads * prompt_length)
    return kv_cache + forward + rows * cfg.vocab_size


def describe(estimate, job):
    """'about 14.9 GB at peak, in a training step (weights 3.1 GB, gradients 3.1 GB, Adam 6.2 GB, activations
    2.5 GB for 8 x 92 positions)' and, when another phase is the peak, that phase first."""
    step = (f"weights {format_bytes(estimate.weights)}, gradients {format_bytes(estimate.gradients)}, "
            f"Adam {format_bytes(estimate.adam)}, activations {format_bytes(estimate.activations)} for "
            f"{job.rows} x {job.length} positions")
    if estimate.phase == "a training step":
        return f"about {format_bytes(estimate.peak)} at peak, in a training step ({step})"
    return (f"about {format_bytes(estimate.peak)} at peak, {estimate.phase}; a training step "
            f"{format_bytes(estimate.step)} ({step})")
