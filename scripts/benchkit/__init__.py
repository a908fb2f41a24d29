"""The benchmark behind ``python scripts/bench.py`` (its docstring has the module map)."""
