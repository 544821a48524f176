"""Job rendering for ``layerfreeze launch``: a Slurm batch script, a Kubernetes PyTorchJob, or
the local ``torchrun`` command, all derived from one run config.

Every job runs the same command once per node, ``python3 -m torch.distributed.run ... -m
layerfreeze train --config=FILE checkpoint.resume=auto [overrides]``: a requeued (Slurm) or
restarted (Kubernetes) job continues from its newest checkpoint. Pure string/dict building, no
torch; the shipped ``launch/slurm.sbatch`` and ``launch/k8s/pytorchjob.yaml`` are renderings of
``configs/llama3_8b/cpt_freeze_deep_deepspeed.yaml`` (a test keeps them in step).

Values are data, never code: a value with a control character (a line break would end a comment
or a directive) is refused by name; the rest is quoted for whoever reads it: ``shlex.quote`` for
bash, backslash escapes for sbatch's ``#SBATCH`` parser (plus ``%%`` for its file-name patterns),
``$$`` for the kubelet's ``$(VAR)`` expansion, ``yaml.safe_dump`` for the manifest.
"""

from __future__ import annotations

import copy
import re
import shlex
import unicodedata
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
#: Slurm's --signal takes 0-65535 s; 0 would leave the ranks no time to save
GRACE_SECONDS_RANGE = (1, 65535)
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
        """Arguments after ``-m layerfreeze``: ``train --config=FILE [checkpoint.resume=auto] ...``.

        ``--config=FILE`` is one argument, so a path starting with ``-`` stays the option's value.
        """
        extra = ["checkpoint.resume=auto"] if resume_auto else []
        return ["train", f"--config={self.config}", *extra, *self.overrides]


def control_char_problem(key: str, value: Any) -> str | None:
    """The error for a control character in ``value`` (None when it has none).

    Control characters are Unicode category Cc (C0 with tab/CR/LF and NUL, DEL, C1) plus the
    line and paragraph separators U+2028/U+2029: YAML and Python's ``splitlines`` break lines on
    some of them, bash on LF, and none has a place in a path, a name or an override.
    """
    if not isinstance(value, str):
        return None
    for i, ch in enumerate(value):
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            return (
                f"{key}: contains a control character (U+{ord(ch):04X}) at position {i}, got "
                f"{value!r}. A job file cannot carry it (a line break would end a comment or a "
                "directive and run the rest as a command); remove it."
            )
    return None


def _override_key(item: str) -> str:
    return item.split("=", 1)[0].strip() or item


def _job_problems(job: JobSpec, scheduler: str | None, out_name: str | None = None) -> list[str]:
    """Every value of ``job`` that cannot be rendered safely, one problem per key."""
    values: list[tuple[str, Any]] = [("--config", job.config)]
    values += [(_override_key(o), o) for o in job.overrides]
    values += [("job name", job.name), ("logging.out_dir", job.out_dir)]
    values += [("checkpoint.dir", job.checkpoint_dir)]
    values += [(f"data.paths[{i}]", p) for i, p in enumerate(job.data_paths)]
    values += [(f"--{k.replace('_', '-')}", v) for k, v in job.options.items()]
    if out_name is not None:
        values.append(("--out", out_name))
    problems: dict[str, str] = {}
    for key, value in values:
        problem = control_char_problem(key, value)
        if problem and key not in problems:
            problems[key] = problem
    if scheduler == "slurm" and "\\" in job.out_dir and "logging.out_dir" not in problems:
        problems["logging.out_dir"] = (
            f"logging.out_dir: contains a backslash, got {job.out_dir!r}. Slurm's --output "
            "takes any backslash as 'no %j patterns', so every job would append to one file "
            "literally named slurm-%j.out; use a directory without backslashes."
        )
    return list(problems.values())


def _check_job(job: JobSpec, scheduler: str | None, out_name: str | None = None) -> None:
    problems = _job_problems(job, scheduler, out_name)
    if problems:
        raise ConfigError(problems)


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
    for key, value in [
        ("--config", str(config)),
        *[(_override_key(o), o) for o in overrides],
        *[(f"--{k.replace('_', '-')}", v) for k, v in options.items()],
    ]:
        problem = control_char_problem(key, value)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(problems)
    cfg = load_config(config, list(overrides))
    problems = [
        p
        for key, value in [
            ("logging.out_dir", cfg.logging.out_dir),
            ("logging.wandb_run_name", cfg.logging.wandb_run_name),
            ("checkpoint.dir", str(cfg.checkpoint_dir)),
            *[(f"data.paths[{i}]", p) for i, p in enumerate(cfg.data.paths)],
        ]
        if (p := control_char_problem(key, value))
    ]
    if problems:
        raise ConfigError(problems)
    if scheduler != "local" and cfg.checkpoint.resume != "auto":
        raise ConfigError(
            f"checkpoint.resume: a {scheduler} job is requeued/restarted and must continue from "
            f"its newest checkpoint, got {cfg.checkpoint.resume!r}. Use checkpoint.resume=auto "
            "(the default)."
        )
    out_dir = cfg.logging.out_dir
    name = cfg.logging.wandb_run_name or Path(out_dir.rstrip("/")).name or "layerfreeze"
    job = JobSpec(
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
    _check_job(job, scheduler)
    return job


def _q(s: str) -> str:
    return shlex.quote(str(s))


def _command_line(job: JobSpec, scheduler: str, out_name: str) -> str:
    """The ``layerfreeze launch`` call that renders this job, shell-quoted (``--key=value`` so a
    value starting with ``-`` stays the option's value)."""
    parts = [
        "layerfreeze",
        "launch",
        f"--scheduler={scheduler}",
        f"--nodes={job.nodes}",
        f"--gpus-per-node={job.gpus_per_node}",
        f"--config={job.config}",
    ]
    for key in (
        "image",
        "time",
        "partition",
        "cpus_per_task",
        "master_port",
        "max_restarts",
        "grace_seconds",
        "workdir",
        "pvc",
    ):
        value = job.options.get(key)
        if value is not None and value != _DEFAULTS.get(key):
            parts.append(f"--{key.replace('_', '-')}={value}")
    parts.append(f"--out={out_name}")
    return shlex.join([*parts, *job.overrides])


_DEFAULTS: dict[str, Any] = {
    "time": "24:00:00",
    "master_port": 29500,
    "max_restarts": 3,
    "image": "layerfreeze:latest",
    "workdir": None,
    "pvc": "layerfreeze-workspace",
    "grace_seconds": 300,
}


def _opt(job: JobSpec, key: str) -> Any:
    value = job.options.get(key)
    return _DEFAULTS.get(key) if value is None else value


def _grace(job: JobSpec) -> int:
    grace = _opt(job, "grace_seconds")
    lo, hi = GRACE_SECONDS_RANGE
    if isinstance(grace, bool) or not isinstance(grace, int) or not lo <= grace <= hi:
        raise ConfigError(
            f"--grace-seconds: must be an integer from {lo} to {hi} (Slurm's --signal limit), "
            f"got {grace!r}. Give the seconds a checkpoint save needs, e.g. 300."
        )
    return grace


# --------------------------------------------------------------------------------------------
# Slurm


def _sbatch_value(value: Any) -> str:
    """``value`` quoted for sbatch's ``#SBATCH`` parser (``_get_argument`` in Slurm's opt.c).

    That parser ends an argument at whitespace outside quotes (a backslash does not protect it),
    drops the rest of the line at an unquoted ``#``, and inside quotes still takes a backslash as
    "next character literal". So anything but plain characters goes in double quotes with ``\\``
    and ``"`` backslash-escaped, and the directive reads back byte for byte.
    """
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_./%:@,+=-]*", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_SLURM = """\
#!/usr/bin/env bash
# layerfreeze job {name}: {nodes} node(s) x {gpus} GPU(s), one torchrun agent per node, c10d
# rendezvous on the allocation's first node. Rendered from {config} by
#   {command}
# (re-render after editing the config; extra sbatch arguments are more config overrides):
#   sbatch {out} [key.sub=value ...]
# Submit from the directory the config's relative paths start from (the repository root).
# Time limit: {grace} s before it Slurm sends SIGTERM to every process of the job step on every
# node (--signal=TERM@{grace}: the torchrun agents and the training ranks). The ranks save a
# checkpoint and exit 75; each agent forwards the signal too and waits up to
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT={grace} s before it SIGKILLs a rank that is still saving.
# Submitting the job again resumes from the newest checkpoint (checkpoint.resume=auto); a node
# failure or preemption requeues it (--requeue). See docs/launch.md, "Signals".
#   data:        {data}
#   checkpoints: {ckpt}
#   logs:        {logs} (this script's output: slurm-<job id>.out there)
#SBATCH --job-name={slurm_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --requeue
#SBATCH --signal=TERM@{grace}
#SBATCH --open-mode=append
#SBATCH --output={output}
{partition}set -euo pipefail
cd -- {workdir}
mkdir -p -- {mkdirs}
for p in {data_check}; do
  if [ ! -e "$p" ]; then
    echo "layerfreeze: data path $p (data.paths) not found under $(pwd)" >&2
    exit 2
  fi
done
export WANDB_MODE=${{WANDB_MODE:-offline}} PYTHONUNBUFFERED=1
# torchrun's agent gives its ranks this long to exit after a SIGTERM, then SIGKILLs them.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={grace}
# The first node hosts the rendezvous (no pipe into head: with pipefail its SIGPIPE kills the job).
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${{HOSTS%%$'\\n'*}}
MASTER_PORT=${{MASTER_PORT:-{port}}}
export MASTER_ADDR MASTER_PORT
ARGS=({train_args} "$@")
# A rank stopped by a signal appends "rank N: 75 ..." to this file (on the shared log directory);
# torchrun reports any stopped rank as 1, so the job's exit status comes from the file.
export LAYERFREEZE_EXIT_FILE={exit_file}
: >"$LAYERFREEZE_EXIT_FILE"
status=0
# No trap here: srun answers SIGTERM by SIGKILLing its tasks, so the batch shell must not pass
# one on; the time-limit SIGTERM goes to the step's processes directly (--signal without B:).
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c 'exec "${{PYTHON:-python3}}" -m torch.distributed.run \\
  --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node {gpus} \\
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \\
  -m layerfreeze "$@"' torchrun "${{ARGS[@]}}" || status=$?
if [ -s "$LAYERFREEZE_EXIT_FILE" ]; then
  echo "layerfreeze: stopped by a signal after saving a checkpoint; submit the job again to continue (exit 75)" >&2
  exit 75
fi
exit "$status"
"""


def render_slurm(job: JobSpec, out_name: str = "job.sbatch") -> str:
    """The Slurm batch script for ``job`` (``bash -n`` clean; see the header it writes).

    Raises:
        ConfigError: a value with a control character, a backslash in ``logging.out_dir``, or
            a ``grace_seconds`` out of range.
    """
    _check_job(job, "slurm", out_name)
    grace = _grace(job)
    gpus = int(job.gpus_per_node)
    cpus = int(job.options.get("cpus_per_task") or 4 * gpus)
    partition = job.options.get("partition")
    workdir = job.options.get("workdir")
    logs = job.out_dir
    # %% is Slurm's literal '%'; %j the job id
    output = f"{logs.replace('%', '%%')}/slurm-%j.out"
    return _SLURM.format(
        name=job.name,
        slurm_name=re.sub(r"[^A-Za-z0-9_.-]+", "_", job.name),
        output=_sbatch_value(output),
        nodes=int(job.nodes),
        gpus=gpus,
        cpus=cpus,
        time=_sbatch_value(_opt(job, "time")),
        grace=grace,
        partition=f"#SBATCH --partition={_sbatch_value(partition)}\n" if partition else "",
        config=job.config,
        command=_command_line(job, "slurm", out_name),
        out=_q(out_name),
        data=" ".join(job.data_paths) or "@bundled (inside the package)",
        ckpt=job.checkpoint_dir,
        logs=logs,
        workdir=_q(workdir) if workdir else '"${SLURM_SUBMIT_DIR:-.}"',
        mkdirs=" ".join(_q(p) for p in (job.checkpoint_dir, logs)),
        exit_file=f'{_q(logs + "/.layerfreeze-exit.")}"$SLURM_JOB_ID"',  # one per job, shared
        data_check=" ".join(_q(p) for p in job.data_paths) or "",
        port=int(_opt(job, "master_port")),
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


def _kubelet_literal(arg: str) -> str:
    """``arg`` as a container command item: the kubelet expands ``$(VAR)`` there and turns
    ``$$`` into ``$``, so each ``$`` is doubled and the process gets ``arg`` unchanged."""
    return arg.replace("$", "$$")


def _pytorchjob(job: JobSpec, out_name: str) -> dict[str, Any]:
    gpus = int(job.gpus_per_node)
    grace = _grace(job)
    workdir = job.options.get("workdir") or "/workspace"
    command = ["python3", "-m", "torch.distributed.run", "-m", "layerfreeze", *job.train_args()]
    container = {
        "name": "pytorch",  # the operator's default container name: required
        "image": _opt(job, "image"),
        "imagePullPolicy": "IfNotPresent",
        "workingDir": workdir,
        "command": [_kubelet_literal(a) for a in command],
        "env": [
            {"name": "WANDB_MODE", "value": "offline"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            # torchrun (PID 1) forwards the kubelet's SIGTERM to the ranks and waits this long
            {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(grace)},
        ],
        "resources": {"limits": {"nvidia.com/gpu": gpus}},
        "volumeMounts": [
            {"name": "workspace", "mountPath": workdir},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    pod = {
        "spec": {
            # SIGTERM on pod deletion/eviction, SIGKILL this many seconds later
            "terminationGracePeriodSeconds": grace,
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
                "layerfreeze/rendered-by": _command_line(job, "k8s", out_name),
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


#: A fixed comment: every value lives in the YAML document (``yaml.safe_dump``), none here.
_K8S_HEADER = """\
# layerfreeze job (Kubeflow training-operator PyTorchJob): one pod per node, one torchrun agent
# per pod. metadata.annotations name the config, the command that rendered this file, the data,
# checkpoint and log paths. Apply with `kubectl apply -f <this file>`.
# The PVC (volumes: workspace) is mounted at the working directory: it must hold the config and
# the paths (relative paths start there). The operator sets the PET_* variables torchrun reads
# (nodes, rendezvous on worker 0, ranks per pod, restarts); a failed pod restarts (OnFailure)
# and resumes from the newest checkpoint (checkpoint.resume=auto). On deletion or eviction
# the kubelet sends SIGTERM to torchrun, which forwards it to the ranks (they save a checkpoint
# and exit 75), and SIGKILLs after terminationGracePeriodSeconds. See docs/launch.md, "Signals".
"""


def render_pytorchjob(job: JobSpec, out_name: str = "pytorchjob.yaml") -> str:
    """The PyTorchJob manifest for ``job``: a fixed comment, then ``yaml.safe_dump`` of the dict.

    Raises:
        ConfigError: a value with a control character, or ``grace_seconds`` out of range.
    """
    _check_job(job, "k8s", out_name)
    body = yaml.safe_dump(
        _pytorchjob(job, out_name),
        sort_keys=False,
        default_flow_style=False,
        width=100,
        allow_unicode=True,
    )
    return _K8S_HEADER + body


# --------------------------------------------------------------------------------------------
# local


def local_command(job: JobSpec, python: str = "python3") -> list[str]:
    """``torchrun --nnodes 1 --nproc-per-node G --standalone -m layerfreeze train ...`` (an argv
    list, run without a shell; print it with ``shlex.join``)."""
    _check_job(job, "local")
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
