"""Pattern-matching graph passes, one idea per file (installed as `segquant_onnx.passes`).

Each pass detects (pure: returns plan data and reasons for declined matches) and rewrites (the only
code that mutates the graph). Only the pipeline stages import passes (pipeline, rewrite); the
other core modules never do.
"""

from segquant_onnx.passes.dual_scale_activations import DualScaleActivations
from segquant_onnx.passes.quantize_linear_inputs import QuantizeLinearInputs
from segquant_onnx.passes.smooth_activations import SmoothActivations
from segquant_onnx.passes.split_linear_by_segment import SplitLinearBySegment
from segquant_onnx.passes.split_outlier_channels import SplitOutlierChannels

__all__ = ["DualScaleActivations", "QuantizeLinearInputs", "SmoothActivations", "SplitLinearBySegment",
           "SplitOutlierChannels"]
