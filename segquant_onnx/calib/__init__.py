"""Calibration: data readers, observers, and the run that reduces each batch to statistics."""
