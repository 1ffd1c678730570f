"""Text generation from the command line (in progress: see the GPT-2 issue)."""
import sys

if __name__ == "__main__":
    sys.exit("generate.py: not yet implemented — use minigpt.generate from Python for now")
