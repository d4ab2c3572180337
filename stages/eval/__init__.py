"""Evaluation helpers: perplexity core (torch only), lm-eval glue, local task registry."""
