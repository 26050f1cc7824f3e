"""The action transformer: per-layer dense / HiMoE / MoDE feed-forward layers, expert caching, flow-matching and
EDM objectives, and Mixture of Horizons. `ActionHead` (head.py) is the entry point."""

from vla.action.head import ActionHead, ActionSample

__all__ = ["ActionHead", "ActionSample"]
