"""``layerfreeze launch``: render a Slurm batch script or a Kubernetes PyTorchJob for a run
config, or run it on this machine with torchrun.

Run::

    layerfreeze launch --scheduler slurm --nodes 4 --gpus-per-node 8 \
        --config configs/llama3_8b/cpt_freeze_deep_deepspeed.yaml --out job.sbatch train.steps=5000
    layerfreeze launch --scheduler k8s --nodes 4 --gpus-per-node 8 --image registry/layerfreeze:1 \
        --config configs/llama3_8b/cpt_freeze_deep_deepspeed.yaml --out job.yaml
    layerfreeze launch --scheduler local --gpus-per-node 2 --config configs/tiny_llama/cpt_freeze_deep_deepspeed.yaml

The config and its overrides are validated first; a value with a control character (newline,
NUL, ...) is refused by name. Rendered jobs always resume from their newest checkpoint
(``checkpoint.resume=auto``) and give the ranks ``--grace-seconds`` after SIGTERM to save one
(docs/launch.md, "Signals"). A value starting with ``-`` is written ``--config=VALUE``. Without
``--out`` the job file goes to stdout. Exit codes: 2 on bad input (nothing written); ``local``
returns torchrun's exit code.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

from layerfreeze.errors import ConfigError
from layerfreeze.utils.io import OVERWRITE_HELP, check_output_path
from layerfreeze.utils.logging import get_logger

logger = get_logger("layerfreeze.launch")


#: options that only one scheduler renders (``--workdir`` is used by both)
_SCHEDULER_OPTIONS = {
    "slurm": ("time", "partition", "cpus_per_task", "master_port"),
    "k8s": ("image", "pvc", "max_restarts"),
}
#: sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or no limit
_SLURM_TIME = re.compile(r"\d+(:\d\d?){0,2}|\d+-\d\d?(:\d\d?){0,2}|(?i:unlimited|infinite)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the job shape, scheduler options, ``--out`` and the positional overrides."""
    parser.add_argument(
        "--scheduler",
        required=True,
        choices=("local", "slurm", "k8s"),
        help="local: run torchrun here; slurm / k8s: render the job file",
    )
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (pods), one torchrun each")
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=1,
        help="ranks per node (GPUs; CPU ranks when there is no GPU)",
    )
    parser.add_argument("--out", help="write the job file here (atomically) instead of stdout")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--image", help="k8s: container image (default layerfreeze:latest)")
    parser.add_argument(
        "--pvc",
        help="k8s: PersistentVolumeClaim mounted as the working directory "
        "(default layerfreeze-workspace)",
    )
    parser.add_argument(
        "--workdir",
        help="working directory of the job (slurm default: the "
        "submit directory; k8s default: /workspace)",
    )
    parser.add_argument("--time", help="slurm: time limit (default 24:00:00)")
    parser.add_argument("--partition", help="slurm: partition")
    parser.add_argument("--cpus-per-task", type=int, help="slurm: CPUs per node (default 4 x GPUs)")
    parser.add_argument("--master-port", type=int, help="slurm: rendezvous port (default 29500)")
    parser.add_argument(
        "--max-restarts", type=int, help="k8s: elastic restarts of the worker group (default 3)"
    )
    parser.add_argument(
        "--grace-seconds",
        type=int,
        help="slurm / k8s: seconds the ranks get to save a checkpoint after SIGTERM: Slurm "
        "signals this long before the time limit (--signal=TERM@N), Kubernetes waits this long "
        "before SIGKILL (terminationGracePeriodSeconds), torchrun waits this long before it "
        "SIGKILLs its ranks (TORCH_ELASTIC_SHUTDOWN_TIMEOUT). 1-65535, default 300",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="local: print the torchrun command instead of running it",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, checked now and passed on to `layerfreeze train`",
    )


def run(args: argparse.Namespace) -> int:
    """Build the job; render it (slurm, k8s) or run torchrun (local)."""
    from layerfreeze.launcher import (
        GRACE_SECONDS_RANGE,
        build_job,
        local_command,
        render_pytorchjob,
        render_slurm,
    )
    from layerfreeze.utils.io import atomic_write_text

    options = {
        k: getattr(args, k)
        for k in (
            "image",
            "pvc",
            "workdir",
            "time",
            "partition",
            "cpus_per_task",
            "master_port",
            "max_restarts",
            "grace_seconds",
        )
    }
    try:
        if args.scheduler == "local":
            given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None]
            if given or args.out:
                raise ConfigError(
                    f"{', '.join(given + (['--out'] if args.out else []))}: not used by "
                    "--scheduler local (it runs torchrun here). Drop them or render a job with "
                    "--scheduler slurm or k8s."
                )
        elif args.dry_run:
            raise ConfigError("--dry-run: only for --scheduler local (slurm/k8s only render).")
        else:  # an option of the other scheduler would be silently left out of the job
            other = "k8s" if args.scheduler == "slurm" else "slurm"
            given = [
                f"--{k.replace('_', '-')}"
                for k in _SCHEDULER_OPTIONS[other]
                if options[k] is not None
            ]
            if given:
                raise ConfigError(
                    f"{', '.join(given)}: only used by --scheduler {other}, got --scheduler "
                    f"{args.scheduler}. Drop them or render with --scheduler {other}."
                )
        if args.time is not None and not _SLURM_TIME.fullmatch(args.time):
            raise ConfigError(
                f"--time: not a Slurm time limit, got {args.time!r}. Use minutes, HH:MM:SS, "
                "D-HH or D-HH:MM:SS (e.g. 48:00:00 or 2-00:00:00)."
            )
        if args.out:
            try:
                check_output_path(args.out, overwrite=args.overwrite, kind="file")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        for flag, value in (
            ("--cpus-per-task", args.cpus_per_task),
            ("--master-port", args.master_port),
            ("--max-restarts", args.max_restarts),
        ):
            if value is not None and value < (0 if flag == "--max-restarts" else 1):
                raise ConfigError(f"{flag}: must be a positive integer, got {value}.")
        lo, hi = GRACE_SECONDS_RANGE
        if args.grace_seconds is not None and not lo <= args.grace_seconds <= hi:
            raise ConfigError(
                f"--grace-seconds: must be from {lo} to {hi} (Slurm's --signal limit), got "
                f"{args.grace_seconds}. Give the seconds a checkpoint save needs, e.g. 300."
            )
        job = build_job(
            args.scheduler,
            args.config,
            args.overrides,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            **options,
        )
        if args.scheduler == "local":
            cmd = local_command(job, python=sys.executable)
        else:
            out_name = args.out or (
                "job.sbatch" if args.scheduler == "slurm" else "pytorchjob.yaml"
            )
            text = (
                render_slurm(job, out_name)
                if args.scheduler == "slurm"
                else render_pytorchjob(job, out_name)
            )
    except ConfigError as e:
        logger.error("%s", e)
        return 2

    if args.scheduler == "local":
        if args.dry_run:
            sys.stdout.write(shlex.join(cmd) + "\n")
            return 0
        env = dict(os.environ)
        env.setdefault("WANDB_MODE", "offline")
        import torch

        if not torch.cuda.is_available():  # CPU ranks over gloo, one thread each
            env.setdefault("DS_ACCELERATOR", "cpu")
            env.setdefault("OMP_NUM_THREADS", "1")
        logger.info("running: %s", shlex.join(cmd))
        return subprocess.call(cmd, env=env)

    if args.out:
        atomic_write_text(args.out, text)
        if args.scheduler == "slurm":
            os.chmod(args.out, 0o755)
        logger.info(
            "wrote %s (%s, %d node(s) x %d)", args.out, args.scheduler, job.nodes, job.gpus_per_node
        )
    else:
        sys.stdout.write(text)
    return 0
