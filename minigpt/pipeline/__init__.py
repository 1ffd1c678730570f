"""Runs of the training pipeline, one per method (sft_run, dpo_run), their settings and shared steps."""
