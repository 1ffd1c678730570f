"""The loss plot of a run: training and validation loss against epochs, tokens seen on a second axis.

Like rasbt's `plot_losses` (ch. 5, 7), drawn on a bare `matplotlib.figure.Figure`: no pyplot, so no
GUI backend and no global state; PNG output goes through the Agg renderer. A DPO run's plot
(`plot_dpo`) has a second panel beside it, the reward margins, as in rasbt's DPO notebook.
"""
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..files.fileio import atomic_write


def plot_losses(history, path, title=None):
    """Draw `history` (lists "epochs", "tokens_seen", "train_loss", "val_loss", as `training.train`
    records them) to a PNG at `path`, atomically; the lowest validation loss is marked."""
    fig = Figure(figsize=(6, 3.5))
    _draw_losses(fig.add_subplot(), history)
    return _save(fig, path, title)


def plot_dpo(history, path, title=None):
    """A DPO run's `history` to a PNG at `path`, atomically: the DPO loss (left, as plot_losses) and the
    reward margin (right; history "train_reward_margin", "val_reward_margin") of the training and
    validation pairs against epochs."""
    fig = Figure(figsize=(11, 3.5))
    loss_axes, margin_axes = fig.subplots(1, 2)
    _draw_losses(loss_axes, history, "DPO loss")
    margin_axes.plot(history["epochs"], history["train_reward_margin"], marker=".", label="Training margin")
    margin_axes.plot(history["epochs"], history["val_reward_margin"], marker=".", linestyle="-.",
                     label="Validation margin")
    margin_axes.set_xlabel("Epochs")
    margin_axes.set_ylabel("Reward margin (chosen - rejected)")
    margin_axes.legend(loc="upper left")
    return _save(fig, path, title)


def _draw_losses(ax_epochs, history, ylabel="Loss"):
    epochs, tokens = history["epochs"], history["tokens_seen"]
    ax_epochs.plot(epochs, history["train_loss"], marker=".", label="Training loss")
    ax_epochs.plot(epochs, history["val_loss"], marker=".", linestyle="-.", label="Validation loss")
    if history["val_loss"]:
        best = min(range(len(epochs)), key=history["val_loss"].__getitem__)
        ax_epochs.plot([epochs[best]], [history["val_loss"][best]], "o", markerfacecolor="none",
                       markersize=10, color="tab:orange", label=f"Best (step {history['steps'][best]})")
    ax_epochs.set_xlabel("Epochs")
    ax_epochs.set_ylabel(ylabel)
    ax_epochs.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_epochs.legend(loc="upper right")
    ax_tokens = ax_epochs.twiny()              # same curve against tokens seen, on the top axis
    ax_tokens.plot(tokens, history["train_loss"], alpha=0)
    ax_tokens.set_xlabel("Tokens seen")


def _save(fig, path, title):
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)
    return path
