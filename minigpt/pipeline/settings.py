"""The settings of a run: RunConfig, the recipes that set its defaults, and their checks.

    config = make_config()                                   # the offline recipe (RunConfig's defaults)
    config = make_config(model="gpt2-small")                 # rasbt's ch. 7 fine-tuning recipe
    config = dpo_run.make_config(weights="sft.npz")          # a method's own recipe on top (DPO's)

RunConfig's defaults are the offline recipe: a small GPT trained from scratch on the built-in dataset
of checkable tasks (minigpt.tasks) with the byte tokenizer. REFERENCE_RECIPE replaces them when the
run starts from pretrained GPT-2 (`model` or `weights`), and a method's recipe (its run module's
RECIPE) goes on top. `python train.py --help` shows each default. config.json of a run folder holds
its RunConfig. The checks here hold for every method; each run checks its own settings too.

A weights file minigpt wrote has a model card (files/model_card.py): the tokenizer and the template the
model was trained with are then the card's (FROM_CARD), and one given that contradicts the card is
refused. A fine-tuning run also goes on with the data the card names, split as it was, so its test set
is still held out (a DPO run trains on preference pairs: its recipe's). A file without a card (written
before cards, or by another tool) implies its tokenizer by its vocabulary, and its template is asked for.
"""
import dataclasses
import math
import os
from pathlib import Path
from typing import Optional

from .. import tasks
from ..evaluate.judge import DEFAULT_JUDGE_TIMEOUT, DEFAULT_OLLAMA_URL
from ..files.model_card import implied_tokenizer, model_file, read_card
from ..files.weights import HUB_REPOS
from ..lora import check_hyperparameters
from ..prompts import CHAT_TEMPLATES, PROMPT_STYLES
from ..tokenizer import TOKENIZERS
from ..training import TrainConfig

DATASETS = ("tasks", "reference")  # besides a path to a JSON file
# The settings that say which data a fine-tuning run trains on and how they are split (a model card's "data")
DATA_SETTINGS = ("data", "data_seed", "n_train", "n_val", "n_test", "shuffle_seed")
# The settings each method takes from the model card of its weights when they are not given
FROM_CARD = {"sft": ("tokenizer", "prompt_style", *DATA_SETTINGS), "dpo": ("tokenizer", "prompt_style")}
# Settings that belong to one method's run (None for every other method, which refuses them).
METHOD_SETTINGS = {"beta": "dpo", "nll_weight": "dpo"}
# Settings a resumed run may change: they bound the run or only affect what happens after training.
RESUME_OVERRIDES = ("max_steps", "max_new_tokens", "judge_model", "ollama_url", "judge_timeout", "export_hf",
                    "vocab_dir", "data_dir", "fit_check")


@dataclasses.dataclass
class RunConfig:
    method: str = "sft"                 # the run: "sft" (pipeline/sft_run.py), "dpo" (pipeline/dpo_run.py)
    # Model: trained from scratch (the sizes below) unless `model` or `weights` is given.
    model: Optional[str] = None         # "gpt2-small" | "gpt2-medium" | "gpt2-large" | "gpt2-xl"
    weights: Optional[str] = None       # a .npz, a .safetensors file or a Hugging Face folder
    tokenizer: str = "byte"             # "byte" (257 ids) or "gpt2" (50,257)
    vocab_dir: Optional[str] = None     # GPT-2's encoder.json + vocab.bpe, for offline use
    emb_dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    context_length: int = 64            # the longest task example is ~50 bytes
    drop_rate: float = 0.0
    # Data: "tasks" (built in; "tasks:KIND,..." a selection), "reference" (rasbt's, downloaded) or a path
    data: str = "tasks"
    data_dir: str = "data"              # where downloads and converted weights are cached
    data_seed: int = 0                  # generates the task dataset
    n_train: int = 43200                # task dataset sizes: 2 epochs of 675 batches of 64 = 1,350 steps
    n_val: int = 250
    n_test: int = 500
    prompt_style: str = "phi3"
    mask_prompt: bool = True            # loss on the response tokens only
    shuffle_seed: Optional[int] = None  # shuffle a JSON file before its 85% / 5% / 10% train/val/test split
    allowed_max_length: int = 1024      # truncate longer training sequences (and at the context length)
    group_by_length: bool = False
    # Training
    epochs: int = 2
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    beta2: float = 0.95                 # a shorter memory of squared gradients: steadier at a high lr
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr: float = 2e-4
    grad_clip: Optional[float] = 1.0    # 0 or None: off
    eval_freq: int = 100
    eval_iter: int = 5
    patience: Optional[int] = None      # 0 or None: no early stopping
    max_steps: Optional[int] = None     # 0 or None: no bound
    checkpoint_every: Optional[int] = None  # None: at every evaluation
    seed: int = 123
    # DPO (minigpt.dpo; None for other methods): the policy's log-probability margins are scaled by beta
    # against the reference's; nll_weight > 0 adds the chosen responses' NLL to the loss (RPO), 0: plain DPO
    beta: Optional[float] = None
    nll_weight: Optional[float] = None
    # LoRA (minigpt.lora): train low-rank adapters of the block linears only; None: every weight trains
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None  # None: the rank (scale alpha / rank = 1)
    # Test-set responses and scores
    max_new_tokens: int = 16
    judge_model: Optional[str] = None   # an Ollama model, e.g. "llama3"
    ollama_url: str = DEFAULT_OLLAMA_URL
    judge_timeout: float = DEFAULT_JUDGE_TIMEOUT  # seconds for one reply, from connecting to its last byte
    # Output
    out_dir: Optional[str] = None       # the run folder; default runs/<name>
    name: Optional[str] = None          # default <model>-<data>-<date>-<time>
    export_hf: bool = False
    # Before the model is loaded: stop when the memory or disk estimate does not fit (pipeline/fit_check.py)
    fit_check: bool = True

    @property
    def pretrained(self):
        return self.model is not None or self.weights is not None

    @property
    def effective_lora_alpha(self):
        """LoRA's alpha: --lora-alpha, else the rank (a scale alpha / r of 1, as the reference's rank 16,
        alpha 16); None when LoRA is off."""
        return self.lora_alpha if self.lora_alpha is not None else self.lora_rank

    def data_settings(self):
        """{setting: value} of DATA_SETTINGS: what a model card records of the data (files.model_card)."""
        return {name: getattr(self, name) for name in DATA_SETTINGS}

    def train_config(self):
        """The training loop's settings (validates them)."""
        return TrainConfig(
            epochs=self.epochs, lr=self.lr, schedule=self.schedule, warmup_steps=self.warmup_steps,
            min_lr=self.min_lr, grad_clip=self.grad_clip or None, eval_freq=self.eval_freq,
            eval_iter=self.eval_iter, patience=self.patience or None, max_steps=self.max_steps or None,
            checkpoint_every=self.checkpoint_every)

    def validate(self):
        """Raise ValueError naming the first setting that cannot work."""
        for name, method in METHOD_SETTINGS.items():
            if getattr(self, name) is not None and self.method != method:
                raise ValueError(f"--{name.replace('_', '-')} is a setting of --method {method}, not of "
                                 f"--method {self.method} (it would be recorded and ignored)")
        if self.model is not None and self.weights is not None:
            raise ValueError("give either model (a GPT-2 name) or weights (a file), not both")
        if self.model is not None and self.model not in HUB_REPOS:
            raise ValueError(f"unknown model {self.model!r}; choose one of: {', '.join(HUB_REPOS)}")
        for name, choices in (("tokenizer", TOKENIZERS), ("prompt_style", PROMPT_STYLES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; "
                                 f"choose one of: {', '.join(choices)}")
        for name in ("emb_dim", "n_layers", "n_heads", "context_length", "n_train", "n_val", "n_test",
                     "allowed_max_length", "batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.judge_timeout < math.inf:
            raise ValueError(f"judge_timeout must be a positive number of seconds, "
                             f"got {self.judge_timeout!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {self.beta2}")
        if not 0 <= self.drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        for name in ("max_steps", "patience"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: off), got {getattr(self, name)}")
        kinds = tasks.selected_kinds(self.data) or ()  # unknown task kinds raise here
        conversations = [kind for kind in kinds if kind in tasks.CONVERSATION_KINDS]
        if conversations and self.prompt_style not in CHAT_TEMPLATES:
            raise ValueError(f"the task kind {conversations[0]} is conversations of several exchanges, and "
                             f"the {self.prompt_style} template holds one: use --prompt-style chat")
        if self.lora_rank is None and self.lora_alpha is not None:
            raise ValueError("lora_alpha is set but LoRA is off: give lora_rank too")
        if self.lora_rank is not None:
            check_hyperparameters(self.lora_rank, self.effective_lora_alpha)
        name = self.name
        if name is not None and (name in ("", ".", "..") or "/" in name or os.sep in name):
            raise ValueError(f"name must be one folder name, which goes under runs/ (no '/', not '..'), got "
                             f"{self.name!r}; give a path with --out-dir")
        self.train_config()

    def check_files(self, data_kind="instruction data", weights=True):
        """Raise FileNotFoundError for a missing --data or (with `weights`) --weights path, before any
        download starts."""
        data = None if tasks.selected_kinds(self.data) or self.data in DATASETS else self.data
        for what, path in (("weights", self.weights if weights else None), (data_kind, data)):
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"{what} file not found: {path}")


# rasbt's ch. 7 settings (gpt_instruction_finetuning.py) for a run from pretrained GPT-2.
REFERENCE_RECIPE = dict(
    tokenizer="gpt2", data="reference", prompt_style="alpaca", mask_prompt=False, drop_rate=0.0,
    allowed_max_length=1024, epochs=2, batch_size=8, lr=5e-5, weight_decay=0.1, beta2=0.999,
    schedule="constant", warmup_steps=0, min_lr=0.0, grad_clip=None, eval_freq=5, eval_iter=5, seed=123,
    max_new_tokens=256)


def make_config(recipe=None, **settings):
    """A RunConfig: the offline defaults, REFERENCE_RECIPE's from pretrained weights (`model` or `weights`),
    then a method's `recipe` (a dict: its run module's RECIPE), then `settings`."""
    unknown = sorted(set(settings) - {field.name for field in dataclasses.fields(RunConfig)})
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(unknown)}")
    pretrained = settings.get("model") is not None or settings.get("weights") is not None
    from_card = settings_of_weights(settings.get("weights"), settings,
                                    FROM_CARD.get(settings.get("method", "sft"), ()))
    return RunConfig(**{**(REFERENCE_RECIPE if pretrained else {}), **(recipe or {}), **from_card,
                        **settings})


def settings_of_weights(path, given, names):
    """{setting: value} of the settings `names` that the weights file at `path` decides: its model card's.
    A tokenizer or prompt style in `given` that contradicts the card is refused (ValueError). Without a
    card, the tokenizer follows from the vocabulary, and a prompt style not given is asked for. Nothing
    without a path, or for one that does not exist (RunConfig.check_files says so)."""
    if path is None or not Path(path).exists():
        return {}
    card = read_card(path)
    if card is None:
        if "prompt_style" not in given:
            raise ValueError(f"{path} has no model card (written before minigpt recorded one, or by another "
                             f"tool), so the prompt template it was trained on is unknown: give "
                             f"--prompt-style ({', '.join(PROMPT_STYLES)}; any for a GPT-2 never fine-tuned)")
        implied = {} if "tokenizer" in given else {"tokenizer": implied_tokenizer(model_file(path))}
        return {name: value for name, value in implied.items() if value is not None}
    for name in ("tokenizer", "prompt_style"):
        if name in given and given[name] != card[name]:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {given[name]} contradicts the model card of {path}: it was trained "
                             f"with {flag} {card[name]}; leave {flag} out")
    recorded = dict(card.get("data", {}), tokenizer=card["tokenizer"], prompt_style=card["prompt_style"])
    return {name: recorded[name] for name in names if name in recorded}
