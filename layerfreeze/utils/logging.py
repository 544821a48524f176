"""Rank-aware logging: the library never prints; it logs once, from rank 0."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    """Return the library logger ``name`` (configured lazily by :func:`setup_logging`)."""
    return logging.getLogger(name)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest and rich swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: int | str = logging.INFO) -> None:
    """Attach a single stream handler to the ``layerfreeze`` logger (idempotent)."""
    root = logging.getLogger("layerfreeze")
    root.setLevel(level)
    if not any(getattr(h, "_layerfreeze", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._layerfreeze = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # torch is a hard dependency; this only guards odd installs
        pass
    return int(os.environ.get("RANK", "0"))


def log_rank0(logger: logging.Logger, msg: str, *args, level: int = logging.INFO) -> None:
    """Log ``msg`` on global rank 0 only."""
    if _rank() == 0:
        logger.log(level, msg, *args)
