"""Diffusion helpers, torch-free at import: rectified-flow sampling through ONNX Runtime, calibration
capture along the sampling trajectory, image metrics, and the demo (FP32 vs naive INT8 vs SegQuant)."""

from segquant_onnx.diffusion.sampling import (LATENT_INPUT, TIMESTEP_INPUT, TIMESTEP_SCALE, OnnxTransformer,
                                              capture_calibration, capture_from_module, flow_times, initial_noise,
                                              onnx_transformer, rectified_flow_sample)

__all__ = ["LATENT_INPUT", "TIMESTEP_INPUT", "TIMESTEP_SCALE", "OnnxTransformer", "capture_calibration",
           "capture_from_module", "flow_times", "initial_noise", "onnx_transformer", "rectified_flow_sample"]
