"""The backbone side's name for the hand-off type: `Prefix` lives in `vla.prefix` (shared with the action head,
which must not import backbones)."""

from vla.prefix import Prefix

__all__ = ["Prefix"]
