"""Job rendering for ``layerfreeze launch``: a Slurm batch script, a Kubernetes PyTorchJob, or
the local ``torchrun`` command, all derived from one run config.

Every job runs the same command once per node, ``python3 -m torch.distributed.run ... -m
layerfreeze train --config FILE checkpoint.resume=auto [overrides]``: a requeued (Slurm) or
restarted (Kubernetes) job continues from its newest checkpoint. Pure string/dict building, no
torch; the shipped ``launch/slurm.sbatch`` and ``launch/k8s/pytorchjob.yaml`` are renderings of
``configs/llama3_8b/cpt_freeze_deep_deepspeed.yaml`` (a test keeps them in step).
"""

from __future__ import annotations

import copy
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from layerfreeze.errors import ConfigError

__all__ = [
    "JobSpec",
    "build_job",
    "render_slurm",
    "render_pytorchjob",
    "local_command",
    "SCHEDULERS",
]

SCHEDULERS = ("local", "slurm", "k8s")
#: Pod and service names get ``-master-0`` / ``-worker-N`` appended; keep room for them.
_K8S_NAME_MAX = 50


@dataclass
class JobSpec:
    """Everything a job file needs, resolved from the run config and the command line.

    Attributes:
        name: job name (``logging.wandb_run_name`` or the last part of ``logging.out_dir``).
        config: the run config path as given (resolved against the job's working directory).
        overrides: ``key.sub=value`` overrides, passed on to ``layerfreeze train``.
        nodes: nodes (one torchrun agent each).
        gpus_per_node: ranks per node (GPUs).
        data_paths: ``data.paths`` (``@bundled`` left out).
        checkpoint_dir: checkpoint directory.
        out_dir: ``logging.out_dir`` (metrics, wandb, scheduler logs).
        options: scheduler options (time, partition, image, ...).
    """

    name: str
    config: str
    overrides: list[str]
    nodes: int
    gpus_per_node: int
    data_paths: list[str]
    checkpoint_dir: str
    out_dir: str
    options: dict[str, Any] = field(default_factory=dict)

    def train_args(self, resume_auto: bool = True) -> list[str]:
        """Arguments after ``-m layerfreeze``: ``train --config FILE [checkpoint.resume=auto] ...``."""
        extra = ["checkpoint.resume=auto"] if resume_auto else []
        return ["train", "--config", self.config, *extra, *self.overrides]


def build_job(
    scheduler: str,
    config: str,
    overrides: list[str] | tuple[str, ...] = (),
    nodes: int = 1,
    gpus_per_node: int = 1,
    **options: Any,
) -> JobSpec:
    """Validate the run config (with overrides) and the job shape; return the :class:`JobSpec`.

    Args:
        scheduler: ``local``, ``slurm`` or ``k8s``.
        config: YAML run config.
        overrides: dotted overrides (checked against the schema here, passed on to the job).
        nodes: nodes (``local``: 1).
        gpus_per_node: ranks per node.
        **options: scheduler options kept in :attr:`JobSpec.options`.

    Raises:
        ConfigError: bad config or overrides, bad job shape, or a ``checkpoint.resume`` other
            than ``auto`` for a scheduler that restarts jobs.
    """
    from layerfreeze.config import load_config

    problems = []
    if scheduler not in SCHEDULERS:
        problems.append(f"--scheduler: must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}.")
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{flag}: must be an integer >= 1, got {value!r}.")
    if scheduler == "local" and nodes != 1:
        problems.append(
            f"--nodes: --scheduler local runs on this machine only, got {nodes}. Use --nodes 1, "
            "or render a multi-node job with --scheduler slurm or k8s."
        )
    if problems:
        raise ConfigError(problems)
    cfg = load_config(config, list(overrides))
    if scheduler != "local" and cfg.checkpoint.resume != "auto":
        raise ConfigError(
            f"checkpoint.resume: a {scheduler} job is requeued/restarted and must continue from "
            f"its newest checkpoint, got {cfg.checkpoint.resume!r}. Use checkpoint.resume=auto "
            "(the default)."
        )
    out_dir = cfg.logging.out_dir
    name = cfg.logging.wandb_run_name or Path(out_dir.rstrip("/")).name or "layerfreeze"
    return JobSpec(
        name=name,
        config=str(config),
        overrides=list(overrides),
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        data_paths=[p for p in cfg.data.paths if p != "@bundled"],
        checkpoint_dir=str(cfg.checkpoint_dir),
        out_dir=out_dir,
        options=dict(options),
    )


def _q(s: str) -> str:
    return shlex.quote(str(s))


def _command_line(job: JobSpec, scheduler: str) -> str:
    parts = [
        "layerfreeze",
        "launch",
        "--scheduler",
        scheduler,
        "--nodes",
        str(job.nodes),
        "--gpus-per-node",
        str(job.gpus_per_node),
        "--config",
        job.config,
    ]
    for key in (
        "image",
        "time",
        "partition",
        "cpus_per_task",
        "master_port",
        "max_restarts",
        "workdir",
        "pvc",
    ):
        value = job.options.get(key)
        if value is not None and value != _DEFAULTS.get(key):
            parts += [f"--{key.replace('_', '-')}", str(value)]
    return " ".join(_q(p) for p in [*parts, *job.overrides])


_DEFAULTS: dict[str, Any] = {
    "time": "24:00:00",
    "master_port": 29500,
    "max_restarts": 3,
    "image": "layerfreeze:latest",
    "workdir": None,
    "pvc": "layerfreeze-workspace",
    "grace_seconds": 120,
}


def _opt(job: JobSpec, key: str) -> Any:
    value = job.options.get(key)
    return _DEFAULTS.get(key) if value is None else value


# --------------------------------------------------------------------------------------------
# Slurm

_SLURM = """\
#!/usr/bin/env bash
# layerfreeze job {name}: {nodes} node(s) x {gpus} GPU(s), one torchrun agent per node, c10d
# rendezvous on the allocation's first node. Rendered from {config} by
#   {command}
# (re-render after editing the config; extra sbatch arguments are more config overrides):
#   sbatch {out} [key.sub=value ...]
# Submit from the directory the config's relative paths start from (the repository root).
# A node failure or preemption requeues the job (--requeue); {grace} s before the time limit
# Slurm sends SIGUSR1 and the job requeues itself. Every start resumes from the newest
# checkpoint (checkpoint.resume=auto); steps after the last checkpoint.every_steps save rerun.
#   data:        {data}
#   checkpoints: {ckpt}
#   logs:        {logs} (this script's output: {logs}/slurm-<job id>.out)
#SBATCH --job-name={slurm_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --requeue
#SBATCH --signal=B:USR1@{grace}
#SBATCH --open-mode=append
#SBATCH --output={output}
{partition}set -euo pipefail
cd {workdir}
mkdir -p {mkdirs}
for p in {data_check}; do
  if [ ! -e "$p" ]; then
    echo "layerfreeze: data path $p (data.paths) not found under $(pwd)" >&2
    exit 2
  fi
done
export WANDB_MODE=${{WANDB_MODE:-offline}} PYTHONUNBUFFERED=1
# The first node hosts the rendezvous (no pipe into head: with pipefail its SIGPIPE kills the job).
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${{HOSTS%%$'\\n'*}}
MASTER_PORT=${{MASTER_PORT:-{port}}}
export MASTER_ADDR MASTER_PORT
ARGS=({train_args} "$@")

on_usr1() {{  # time limit close: requeue (the restart resumes), stop the step cleanly
  echo "layerfreeze: SIGUSR1 (time limit close): requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID" || true
  kill -TERM "$STEP" 2>/dev/null || true
  wait "$STEP" || true
  exit 0
}}
on_term() {{  # scancel / preemption: stop the step; Slurm decides about requeueing
  kill -TERM "$STEP" 2>/dev/null || true
  wait "$STEP" || true
  exit 143
}}
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c 'exec "${{PYTHON:-python3}}" -m torch.distributed.run \\
  --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node {gpus} \\
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \\
  -m layerfreeze "$@"' torchrun "${{ARGS[@]}}" &
STEP=$!
trap on_usr1 USR1
trap on_term TERM
wait "$STEP"
"""


def render_slurm(job: JobSpec, out_name: str = "job.sbatch") -> str:
    """The Slurm batch script for ``job`` (``bash -n`` clean; see the header it writes)."""
    gpus = job.gpus_per_node
    cpus = job.options.get("cpus_per_task") or 4 * gpus
    partition = job.options.get("partition")
    workdir = job.options.get("workdir")
    logs = job.out_dir
    output = f"{logs}/slurm-%j.out"
    return _SLURM.format(
        name=job.name,
        slurm_name=re.sub(r"[^A-Za-z0-9_.-]+", "_", job.name),
        output=f'"{output}"' if re.search(r"\s", output) else output,
        nodes=job.nodes,
        gpus=gpus,
        cpus=cpus,
        time=_opt(job, "time"),
        grace=_opt(job, "grace_seconds"),
        partition=f"#SBATCH --partition={partition}\n" if partition else "",
        config=job.config,
        command=_command_line(job, "slurm") + f" --out {_q(out_name)}",
        out=out_name,
        data=" ".join(job.data_paths) or "@bundled (inside the package)",
        ckpt=job.checkpoint_dir,
        logs=logs,
        workdir=_q(workdir) if workdir else '"${SLURM_SUBMIT_DIR:-.}"',
        mkdirs=" ".join(_q(p) for p in (job.checkpoint_dir, logs)),
        data_check=" ".join(_q(p) for p in job.data_paths) or "",
        port=_opt(job, "master_port"),
        train_args=" ".join(_q(a) for a in job.train_args()),
    )


# --------------------------------------------------------------------------------------------
# Kubernetes (Kubeflow training-operator PyTorchJob, kubeflow.org/v1)


def k8s_name(name: str) -> str:
    """``name`` as a DNS-1035 label (lowercase letters, digits, '-'; starts with a letter)."""
    s = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    s = re.sub(r"-{2,}", "-", s)
    if not s or not s[0].isalpha():
        s = f"lf-{s}".rstrip("-")
    return s[:_K8S_NAME_MAX].rstrip("-")


def _pytorchjob(job: JobSpec) -> dict[str, Any]:
    gpus = job.gpus_per_node
    workdir = job.options.get("workdir") or "/workspace"
    command = ["python3", "-m", "torch.distributed.run", "-m", "layerfreeze", *job.train_args()]
    container = {
        "name": "pytorch",  # the operator's default container name: required
        "image": _opt(job, "image"),
        "imagePullPolicy": "IfNotPresent",
        "workingDir": workdir,
        "command": command,
        "env": [
            {"name": "WANDB_MODE", "value": "offline"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "resources": {"limits": {"nvidia.com/gpu": gpus}},
        "volumeMounts": [
            {"name": "workspace", "mountPath": workdir},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    pod = {
        "spec": {
            "containers": [container],
            "volumes": [
                {"name": "workspace", "persistentVolumeClaim": {"claimName": _opt(job, "pvc")}},
                {"name": "shm", "emptyDir": {"medium": "Memory"}},
            ],
        }
    }
    replicas: dict[str, Any] = {}
    # Separate copies, so the YAML has no anchors/aliases.
    if job.nodes > 1:
        replicas["Master"] = {
            "replicas": 1,
            "restartPolicy": "OnFailure",
            "template": copy.deepcopy(pod),
        }
    # The elastic policy needs Worker replicas; the rendezvous is hosted by worker 0.
    replicas["Worker"] = {
        "replicas": job.nodes - 1 if job.nodes > 1 else 1,
        "restartPolicy": "OnFailure",
        "template": copy.deepcopy(pod),
    }
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {
            "name": k8s_name(job.name),
            "labels": {"app.kubernetes.io/name": "layerfreeze"},
            "annotations": {
                "layerfreeze/config": job.config,
                "layerfreeze/data": ",".join(job.data_paths) or "@bundled",
                "layerfreeze/checkpoints": job.checkpoint_dir,
                "layerfreeze/logs": job.out_dir,
            },
        },
        "spec": {
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 10 * job.nodes},
            "elasticPolicy": {
                "rdzvBackend": "c10d",
                "minReplicas": job.nodes,
                "maxReplicas": job.nodes,
                "maxRestarts": int(_opt(job, "max_restarts")),
            },
            "nprocPerNode": str(gpus),
            "pytorchReplicaSpecs": replicas,
        },
    }


def render_pytorchjob(job: JobSpec, out_name: str = "pytorchjob.yaml") -> str:
    """The PyTorchJob manifest for ``job`` (YAML with a header comment)."""
    workdir = job.options.get("workdir") or "/workspace"
    header = (
        f"# layerfreeze job {job.name}: {job.nodes} pod(s) x {job.gpus_per_node} GPU(s) "
        "(Kubeflow training-operator PyTorchJob).\n"
        f"# Rendered from {job.config} by\n#   {_command_line(job, 'k8s')} --out {out_name}\n"
        f"#   kubectl apply -f {out_name}\n"
        f"# The PVC {_opt(job, 'pvc')} is mounted at {workdir} (the working directory): it must\n"
        "# hold the config and the paths below (relative paths start there). The operator sets\n"
        "# the PET_* variables torchrun reads (nodes, rendezvous on worker 0, ranks per pod,\n"
        "# restarts); a failed pod restarts (OnFailure) and resumes from the newest checkpoint\n"
        "# (checkpoint.resume=auto).\n"
        f"#   data:        {' '.join(job.data_paths) or '@bundled (inside the package)'}\n"
        f"#   checkpoints: {job.checkpoint_dir}\n#   logs:        {job.out_dir}\n"
    )
    body = yaml.safe_dump(_pytorchjob(job), sort_keys=False, default_flow_style=False, width=100)
    return header + body


# --------------------------------------------------------------------------------------------
# local


def local_command(job: JobSpec, python: str = "python3") -> list[str]:
    """``torchrun --nnodes 1 --nproc-per-node G --standalone -m layerfreeze train ...``."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(job.gpus_per_node),
        "--standalone",
        "-m",
        "layerfreeze",
        *job.train_args(resume_auto=False),
    ]
