"""Shared checks for in-process CLI tests."""

from __future__ import annotations

from layerfreeze.cli import main


def error_line(capsys, argv: list[str]) -> str:
    """Run ``argv``; it must exit 2, print nothing on stdout and end stderr with one ERROR line
    (no traceback). Returns that line."""
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = [x for x in cap.err.splitlines() if x.strip()]
    errors = [x for x in lines if " ERROR " in x]
    assert len(errors) == 1 and errors[0] == lines[-1], cap.err
    assert "Traceback" not in cap.err
    return errors[0]
