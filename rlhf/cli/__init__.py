"""The `speechrl` command line (the top layer: it may import every other)."""
from speechrl.rlhf.cli.main import main

__all__ = ["main"]
