"""Solve: statistics -> parameters. quant_math (pure formulas), choose (-> Recipe), fit (Recipe -> Quantization)."""
