"""Judging response quality (rasbt ch. 7, section 7.7-7.8): `scores` (exact match, ROUGE-L F1) and `judge`
(an LLM served by Ollama). `python -m minigpt.evaluate RESPONSES.json` prints both."""
