"""Judging response quality (rasbt ch. 7, section 7.7-7.8): `scores` (exact match, ROUGE-L F1) and `judge`
(an LLM served by Ollama); and as the field does it (docs/evaluation.md): `multiple_choice` (benchmarks
scored by log-likelihood) with its questions `mmlu`, `hellaswag` and `task_choices` and its command
`benchmark`, and `compare` (two models judged side by side). `python -m minigpt.evaluate` runs them."""
