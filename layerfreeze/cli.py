"""`layerfreeze` command line: parses arguments and calls one function per subcommand.

Run ``layerfreeze --help``; each subcommand lives in ``layerfreeze/commands/<name>.py`` with
``add_arguments(parser)`` and ``run(args) -> int`` so this file holds no logic.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs,
# except for building --help (which imports each to register its arguments).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("layerfreeze.commands.train", "continued pre-training with a layer plan (DeepSpeed)"),
    "eval": ("layerfreeze.commands.eval", "score a model on C-Eval or CMMLU"),
    "plan": ("layerfreeze.commands.plan", "resolve a layer plan against a model and print it"),
    "validate": ("layerfreeze.commands.validate", "check a training config and print the schema"),
    "tokenizer": ("layerfreeze.commands.tokenizer", "train a SentencePiece tokenizer for AutoTokenizer"),
    "launch": ("layerfreeze.commands.launch", "render a Slurm / Kubernetes job for a config, or run it locally"),
    "trace": ("layerfreeze.commands.trace", "per-layer diagnostics on a probe set (and a plan from them)"),
    "prune": ("layerfreeze.commands.prune", "remove the layers that change the residual stream least"),
    "compose": ("layerfreeze.commands.compose", "a hybrid model from the layers of several checkpoints"),
    "export": ("layerfreeze.commands.export", "export a trained plan as a PEFT adapter or merged checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerfreeze", description=__doc__.splitlines()[0])
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
    args = build_parser().parse_args(argv)
    from layerfreeze.utils.logging import setup_logging

    setup_logging()
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
