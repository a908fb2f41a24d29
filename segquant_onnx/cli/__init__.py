"""The command line (`segquant-onnx`, `python -m segquant_onnx`)."""

from segquant_onnx.cli.app import main

__all__ = ["main"]
