"""Two models judged side by side, offline: a run's model against itself before training. Not a test.

    python train.py --out-dir runs/default             # once: the default run (~4 min)
    python benchmarks/compare_demo.py runs/default     # the demonstration of docs/evaluation.md

There is no LLM judge offline, so this serves Ollama's /api/chat on 127.0.0.1 with a stand-in judge whose
behaviour is known: it picks the response that equals the correct output when exactly one does, and
otherwise answers "A", the response shown first, the position bias LLM judges are known for. Model 1 is
the run's test responses (test-responses.json); model 2 answers the same test prompts with the run's
model before training (its step-0 weights, as `benchmark --before` rebuilds them), written beside them
as test-responses-before-training.json. Then `python -m minigpt.evaluate compare` judges every pair in
both orders and writes its results into the run folder and its report.md: where both responses are
wrong the stand-in always says "A", and asking twice turns that into a tie instead of a win.
"""
import argparse
import http.server
import json
import re
import sys
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from minigpt.evaluate import benchmark  # noqa: E402
from minigpt.evaluate.__main__ import main as evaluate_main  # noqa: E402
from minigpt.files.fileio import parse_json, write_json  # noqa: E402
from minigpt.pipeline.responses import generate_responses, with_responses  # noqa: E402
from minigpt.tokenizer import tokenizer_for  # noqa: E402

PROMPT = re.compile(r"correct output `(.*)`, which of two responses is better\?\nResponse A: `(.*)`\n"
                    r"Response B: `(.*)`\nRespond", re.S)


def stand_in_verdict(prompt):
    """'A' or 'B': the one response equal to the correct output, else 'A' (the first position)."""
    expected, first, second = PROMPT.search(prompt).groups()
    return "B" if second.strip() == expected.strip() != first.strip() else "A"


class StandInJudge(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        verdict = stand_in_verdict(request["messages"][0]["content"])
        body = json.dumps({"message": {"role": "assistant", "content": verdict}, "done": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a fine-tuning run's folder (python train.py --out-dir DIR)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    settings = parse_json((run_dir / "config.json").read_bytes(), run_dir / "config.json")
    entries = parse_json((run_dir / "test-responses.json").read_bytes(), run_dir / "test-responses.json")
    before, label = benchmark.load_model(argparse.Namespace(model=None, source=str(run_dir), before=True),
                                         run_dir, settings)
    tokenizer = tokenizer_for(before.cfg.vocab_size, settings["tokenizer"], settings["vocab_dir"])
    print(f"model 2: {label}, answering the {len(entries)} test prompts")
    responses = generate_responses(before, tokenizer, entries, settings["prompt_style"],
                                   settings["max_new_tokens"])
    before_path = run_dir / "test-responses-before-training.json"
    write_json(before_path, with_responses([{k: v for k, v in e.items() if k != "model_response"}
                                            for e in entries], responses))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandInJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return evaluate_main(["compare", str(run_dir), str(before_path), "--judge-model", "stand-in",
                              "--ollama-url", f"http://127.0.0.1:{server.server_address[1]}"])
    finally:
        server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
