"""`layerfreeze` command line: parses arguments and calls one function per subcommand.

Run ``layerfreeze --help``; each subcommand lives in ``layerfreeze/commands/<name>.py`` with
``add_arguments(parser)`` and ``run(args) -> int`` so this file holds no logic.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys
from typing import NoReturn

# name -> (module, one-line help). Modules are imported only when their command runs,
# except for building --help (which imports each to register its arguments).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "layerfreeze.commands.train",
        "continued pre-training with a layer plan (DeepSpeed or Megatron-core)",
    ),
    "eval": ("layerfreeze.commands.eval", "score a model on C-Eval or CMMLU"),
    "plan": ("layerfreeze.commands.plan", "resolve a layer plan against a model and print it"),
    "validate": ("layerfreeze.commands.validate", "check a training config and print the schema"),
    "tokenizer": ("layerfreeze.commands.tokenizer", "train a SentencePiece tokenizer, or extend a base one with new pieces"),
    "launch": ("layerfreeze.commands.launch", "render a Slurm / Kubernetes job for a config, or run it locally"),
    "trace": ("layerfreeze.commands.trace", "per-layer diagnostics on a probe set (and a plan from them)"),
    "prune": ("layerfreeze.commands.prune", "remove the layers that change the residual stream least"),
    "compose": ("layerfreeze.commands.compose", "a hybrid model from the layers of several checkpoints"),
    "export": ("layerfreeze.commands.export", "export a trained plan as a PEFT adapter or merged checkpoint"),
}


class _UsageError(Exception):
    """A command line argparse rejects (unknown option, bad int, missing or conflicting flags)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other user error (exit code 2).

    Plain argparse prints the whole usage block before its message; here the message names the
    command and where to read its options. Subcommand parsers inherit this class.
    """

    def error(self, message: str) -> NoReturn:
        hint = ""
        flag = re.fullmatch(r"argument (--[\w-]+)(?:/\S+)?: expected one argument", message)
        if flag:  # argparse takes a value such as '-4:-1:prefix' for an option
            hint = f" (a value that starts with '-' is written {flag.group(1)}=VALUE)"
        raise _UsageError(f"{self.prog}: {message.rstrip('.')}{hint}. See '{self.prog} --help'.")


class _DeepSpeedToStderr(logging.Filter):
    """DeepSpeed logs through its own handler on stdout (e.g. 'Setting accelerator to CPU' when
    transformers or accelerate import it); stdout holds results here, so its records go to the
    layerfreeze stderr handler instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        for handler in logging.getLogger("layerfreeze").handlers:
            if getattr(handler, "_layerfreeze", False):
                handler.handle(record)
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="layerfreeze", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sp)
        sp.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the env carries the same.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    from layerfreeze.utils.logging import setup_logging

    setup_logging()
    errors = _ErrorLines()
    logging.getLogger("layerfreeze").addHandler(errors)
    deepspeed_filter = _DeepSpeedToStderr()
    logging.getLogger("DeepSpeed").addFilter(deepspeed_filter)
    try:
        try:
            args = build_parser().parse_args(argv)
        except _UsageError as e:
            logging.getLogger("layerfreeze.cli").error("%s", e)
            rc = 2
        else:
            rc = int(importlib.import_module(args._module).run(args) or 0)
    finally:
        logging.getLogger("layerfreeze").removeHandler(errors)
        logging.getLogger("DeepSpeed").removeFilter(deepspeed_filter)
    if rc == 2 and errors.lines and os.environ.get("LAYERFREEZE_ERROR_FILE"):
        _append_error(os.environ["LAYERFREEZE_ERROR_FILE"], errors.lines[-1])
    return rc


class _ErrorLines(logging.Handler):
    """Keeps the ERROR messages a command logs (the last one is its user-error line)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(" ".join(record.getMessage().split()))


def _append_error(path: str, line: str) -> None:
    """Under a launcher (torchrun, deepspeed) each rank's user-error line goes to
    ``$LAYERFREEZE_ERROR_FILE`` (one appended line per rank), which the launch scripts print as
    the job's last line: torchrun itself only reports ``ChildFailedError`` with exit code 1."""
    rank = os.environ.get("RANK", "0")
    with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as f:
        f.write(f"rank {rank}: {line}\n")


if __name__ == "__main__":
    sys.exit(main())
