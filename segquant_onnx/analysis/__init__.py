"""Model-output analysis: held-back scoring, sensitivity and fallback, outlier search, per-layer error, compare."""
