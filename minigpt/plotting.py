"""The loss plot of a run: training and validation loss against epochs, tokens seen on a second axis.

Like rasbt's `plot_losses` (ch. 5, 7), drawn on a bare `matplotlib.figure.Figure`: no pyplot, so no
GUI backend and no global state; PNG output goes through the Agg renderer.
"""
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .fileio import atomic_write


def plot_losses(history, path, title=None):
    """Draw `history` (lists "epochs", "tokens_seen", "train_loss", "val_loss", as `training.train`
    records them) to a PNG at `path`, atomically; the lowest validation loss is marked."""
    epochs, tokens = history["epochs"], history["tokens_seen"]
    fig = Figure(figsize=(6, 3.5))
    ax_epochs = fig.add_subplot()
    ax_epochs.plot(epochs, history["train_loss"], marker=".", label="Training loss")
    ax_epochs.plot(epochs, history["val_loss"], marker=".", linestyle="-.", label="Validation loss")
    if history["val_loss"]:
        best = min(range(len(epochs)), key=history["val_loss"].__getitem__)
        ax_epochs.plot([epochs[best]], [history["val_loss"][best]], "o", markerfacecolor="none",
                       markersize=10, color="tab:orange", label=f"Best (step {history['steps'][best]})")
    ax_epochs.set_xlabel("Epochs")
    ax_epochs.set_ylabel("Loss")
    ax_epochs.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_epochs.legend(loc="upper right")
    ax_tokens = ax_epochs.twiny()              # same curve against tokens seen, on the top axis
    ax_tokens.plot(tokens, history["train_loss"], alpha=0)
    ax_tokens.set_xlabel("Tokens seen")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)
    return path
