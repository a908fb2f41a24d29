"""The package version: one place, read by setup.cfg, the report and `--version`."""

__version__ = "0.1.0"
