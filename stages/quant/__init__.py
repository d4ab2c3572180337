"""Quantization algorithms (RTN, GPTQ, AutoRound) and their shared math and block plumbing."""
