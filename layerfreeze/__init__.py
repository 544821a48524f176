"""layerfreeze: per-layer training plans for continued pre-training (public API only)."""

__version__ = "0.1.0"
