"""Recovery after quantization: end-to-end scale tuning or low-rank adapters (the `recover` stage's cores)."""
