"""TensorRT: the static Q/DQ rule checker, placement rules and engine builds (TensorRT-RTX on CPU, TensorRT on GPU)."""
