"""Quantization math and the solver: statistics -> scales, smoothing vectors, DualScale parameters."""
