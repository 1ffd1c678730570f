"""Instruction fine-tuning (in progress: see the fine-tuning issue)."""
import sys

if __name__ == "__main__":
    sys.exit("train.py: not yet implemented — the fine-tuning pipeline is being built")
