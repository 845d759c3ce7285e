"""The operational modes, one `Mode` object each (base.py), found by the recipe's `mode`.

Importing this package registers them in `speechrl.rlhf.core.registry.MODES`."""
from speechrl.rlhf.modes import asr, duplex, realtime, tts  # noqa: F401  (fills the registry)
from speechrl.rlhf.modes.base import Mode, get_mode

__all__ = ["Mode", "get_mode"]
