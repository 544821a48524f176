"""``layerfreeze launch``: rendered Slurm scripts and PyTorchJobs, checked by bash, YAML and the
rules the Kubeflow training-operator's admission webhook enforces; the shipped job files are
renderings; bad input exits 2 and writes nothing.

The end-to-end Slurm run (stand-in ``srun``/``scontrol``) is in ``tests/e2e/test_launch_slurm.py``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from layerfreeze.cli import main

REPO = Path(__file__).resolve().parents[2]
LLAMA = "configs/llama3_8b/cpt_freeze_deep_deepspeed.yaml"
TINY = "configs/tiny_llama/cpt_freeze_deep_deepspeed.yaml"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # shipped configs use paths relative to the repository root


def _render(capsys, *argv) -> str:
    assert main(["launch", *argv]) == 0
    return capsys.readouterr().out


def _sbatch_options(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH ") :].partition("=")
            out[key] = value
    return out


def _operator_problems(job: dict) -> list[str]:
    """The checks of training-operator's ``pytorchjob_webhook.go`` (v1) plus the defaults its
    controller needs (container ``pytorch`` with an image in every replica)."""
    problems = []
    if job.get("apiVersion") != "kubeflow.org/v1" or job.get("kind") != "PyTorchJob":
        problems.append("apiVersion/kind")
    name = job.get("metadata", {}).get("name", "")
    if not DNS1035.match(name) or len(name) > 63:
        problems.append(f"metadata.name {name!r} is not a DNS-1035 label")
    spec = job.get("spec", {})
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if not replicas:
        problems.append("spec.pytorchReplicaSpecs missing")
    if spec.get("elasticPolicy") is not None:
        if "Worker" not in replicas:
            problems.append("Worker must be configured if elastic policy is used")
        if "nProcPerNode" in spec["elasticPolicy"] and "nprocPerNode" in spec:
            problems.append("elasticPolicy.nProcPerNode must not be used with nprocPerNode")
    for rtype, rspec in replicas.items():
        if rtype not in ("Master", "Worker"):
            problems.append(f"replica type {rtype}")
        n = rspec.get("replicas")
        if rtype == "Master" and n != 1:
            problems.append("Master replicas must be 1")
        if rtype == "Worker" and n is not None and n < 1:
            problems.append("Worker replicas must be at least 1")
        containers = rspec.get("template", {}).get("spec", {}).get("containers") or []
        named = [c for c in containers if c.get("name") == "pytorch"]
        if not named or not all(c.get("image") for c in containers):
            problems.append(f"{rtype}: needs a container named pytorch, each with an image")
    return problems


# ---------------------------------------------------------------------------------------------
# Slurm


def test_slurm_script_is_valid_bash_with_the_job_shape(capsys, tmp_path):
    text = _render(
        capsys,
        "--scheduler",
        "slurm",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--config",
        LLAMA,
        "--time",
        "2-00:00:00",
        "--partition",
        "gpu",
        "train.steps=5000",
        "optim.lr=2e-5",
    )
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)
    opts = _sbatch_options(text)
    assert opts["--job-name"] == "llama3_8b_freeze_deep"  # from logging.out_dir
    assert opts["--nodes"] == "4" and opts["--gpus-per-node"] == "8"
    assert opts["--ntasks-per-node"] == "1" and opts["--cpus-per-task"] == "32"
    assert opts["--time"] == "2-00:00:00" and opts["--partition"] == "gpu"
    # SIGTERM to every process of the step (not B:, the batch shell), the default 300 s before
    assert "--requeue" in opts and opts["--signal"] == "TERM@300"
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300\n" in text
    assert opts["--output"] == "runs/llama3_8b_freeze_deep/slurm-%j.out"
    args_line = next(line for line in text.splitlines() if line.startswith("ARGS=("))
    assert shlex.split(args_line[len("ARGS=(") : -1]) == [
        "train",
        f"--config={LLAMA}",
        "checkpoint.resume=auto",
        "train.steps=5000",
        "optim.lr=2e-5",
        "$@",
    ]
    assert "--nproc_per_node 8" in text and "--rdzv_backend c10d" in text
    assert "mkdir -p -- runs/llama3_8b_freeze_deep/checkpoints runs/llama3_8b_freeze_deep" in text
    assert "for p in data/cpt; do" in text  # data paths checked before anything starts
    # no batch-shell trap: srun would answer a forwarded SIGTERM with SIGKILL to its tasks
    assert "\ntrap " not in text and "scontrol requeue" not in text


def test_slurm_quotes_overrides_and_paths(capsys, tmp_path):
    text = _render(
        capsys,
        "--scheduler",
        "slurm",
        "--config",
        TINY,
        "logging.out_dir=runs/with space",
        "logging.wandb_run_name=my run",
    )
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)
    # Let bash itself parse the ARGS array: each override stays one argument.
    args_line = next(line for line in text.splitlines() if line.startswith("ARGS=("))
    probe = args_line.replace('"$@"', "") + '\nprintf "%s\\n" "${ARGS[@]}"\n'
    got = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout
    assert got.splitlines()[-2:] == [
        "logging.out_dir=runs/with space",
        "logging.wandb_run_name=my run",
    ]
    assert "mkdir -p -- 'runs/with space/checkpoints' 'runs/with space'" in text
    opts = _sbatch_options(text)
    assert opts["--job-name"] == "my_run"  # one word for sbatch's directive parser
    assert opts["--output"] == '"runs/with space/slurm-%j.out"'
    # hostile values in every field: tests/faults/test_launch_injection.py


# ---------------------------------------------------------------------------------------------
# Kubernetes


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_pytorchjob_passes_the_operator_rules(capsys, nodes):
    text = _render(
        capsys,
        "--scheduler",
        "k8s",
        "--nodes",
        str(nodes),
        "--gpus-per-node",
        "8",
        "--config",
        LLAMA,
        "--image",
        "registry.example/layerfreeze:1.2",
        "train.steps=100",
    )
    job = yaml.safe_load(text)
    assert _operator_problems(job) == []
    spec = job["spec"]
    reps = spec["pytorchReplicaSpecs"]
    assert sum(r["replicas"] for r in reps.values()) == nodes  # one pod per node
    assert ("Master" in reps) == (nodes > 1)
    # The operator sets PET_NNODES to "min:max" from the elastic policy: the whole job.
    assert spec["elasticPolicy"] == {
        "rdzvBackend": "c10d",
        "minReplicas": nodes,
        "maxReplicas": nodes,
        "maxRestarts": 3,
    }
    assert spec["nprocPerNode"] == "8"
    assert job["metadata"]["name"] == "llama3-8b-freeze-deep"
    for r in reps.values():
        assert r["restartPolicy"] == "OnFailure"
        pod = r["template"]["spec"]
        (c,) = pod["containers"]
        assert c["image"] == "registry.example/layerfreeze:1.2"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert c["command"][:5] == ["python3", "-m", "torch.distributed.run", "-m", "layerfreeze"]
        assert c["command"][5:] == [
            "train",
            f"--config={LLAMA}",
            "checkpoint.resume=auto",
            "train.steps=100",
        ]
        # SIGTERM, then SIGKILL after the grace period; torchrun waits as long for its ranks
        assert pod["terminationGracePeriodSeconds"] == 300
        assert {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": "300"} in c["env"]
        volumes = {v["name"] for v in pod["volumes"]}
        assert {m["name"] for m in c["volumeMounts"]} <= volumes
        assert c["workingDir"] == "/workspace"
        assert {"name": "workspace", "mountPath": "/workspace"} in c["volumeMounts"]
    ann = job["metadata"]["annotations"]
    assert ann["layerfreeze/data"] == "data/cpt"
    assert ann["layerfreeze/checkpoints"] == "runs/llama3_8b_freeze_deep/checkpoints"
    assert "&" not in text.split("apiVersion", 1)[1]  # no YAML anchors/aliases


def test_k8s_names_are_dns_labels():
    from layerfreeze.launcher import k8s_name

    for raw in ("Llama3_8B run", "123-run", "___", "a" * 80, "x--y"):
        name = k8s_name(raw)
        assert DNS1035.match(name) and len(name) <= 50, (raw, name)


# ---------------------------------------------------------------------------------------------
# shipped templates are renderings


@pytest.mark.parametrize(
    "scheduler,path", [("slurm", "launch/slurm.sbatch"), ("k8s", "launch/k8s/pytorchjob.yaml")]
)
def test_shipped_job_files_are_renderings(scheduler, path):
    from layerfreeze.launcher import build_job, render_pytorchjob, render_slurm

    job = build_job(scheduler, LLAMA, nodes=2, gpus_per_node=8)
    text = render_slurm(job, path) if scheduler == "slurm" else render_pytorchjob(job, path)
    assert (REPO / path).read_text() == text, (
        f"{path} is out of date: regenerate with `layerfreeze launch --scheduler {scheduler} "
        f"--nodes 2 --gpus-per-node 8 --config {LLAMA} --out {path}`"
    )


# ---------------------------------------------------------------------------------------------
# local, errors


def test_local_dry_run_is_single_node_torchrun(capsys):
    out = _render(
        capsys,
        "--scheduler",
        "local",
        "--gpus-per-node",
        "2",
        "--config",
        TINY,
        "--dry-run",
        "train.steps=4",
    )
    cmd = out.split()
    assert cmd[1:9] == [
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
    ]
    assert cmd[9:] == ["layerfreeze", "train", f"--config={TINY}", "train.steps=4"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--scheduler", "slurm", "--config", TINY, "train.stepz=3"], "train.stepz"),
        (["--scheduler", "slurm", "--config", "missing.yaml"], "file not found"),
        (
            ["--scheduler", "slurm", "--nodes", "0", "--config", TINY],
            "--nodes: must be an integer >= 1",
        ),
        (["--scheduler", "k8s", "--config", TINY, "checkpoint.resume=none"], "checkpoint.resume"),
        (["--scheduler", "local", "--nodes", "2", "--config", TINY], "runs on this machine only"),
        (["--scheduler", "local", "--config", TINY, "--image", "x"], "--image: not used"),
        (["--scheduler", "slurm", "--config", TINY, "--dry-run"], "--dry-run: only for"),
        (["--scheduler", "slurm", "--config", TINY, "--grace-seconds", "0"], "--grace-seconds:"),
        (["--scheduler", "k8s", "--config", TINY, "--grace-seconds", "65536"], "--grace-seconds:"),
        (["--scheduler", "local", "--config", TINY, "--grace-seconds", "60"], "not used by"),
    ],
)
def test_user_errors_exit_2_and_write_nothing(tmp_path, argv, needle):
    import logging

    out = tmp_path / "job.out"
    extra = [] if "local" in argv else ["--out", str(out)]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("layerfreeze.launch").addHandler(handler)
    try:
        assert main(["launch", *argv, *extra]) == 2
    finally:
        logging.getLogger("layerfreeze.launch").removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert len(messages) == 1 and needle in messages[0], messages
    assert "\n" not in messages[0]  # one line
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("scheduler", ["slurm", "k8s"])
def test_grace_seconds_reaches_every_timer(capsys, scheduler):
    """One option sets Slurm's signal lead time / the pod's grace period and torchrun's wait."""
    text = _render(capsys, "--scheduler", scheduler, "--config", TINY, "--grace-seconds", "900")
    if scheduler == "slurm":
        assert _sbatch_options(text)["--signal"] == "TERM@900"
        assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=900\n" in text
    else:
        (rep,) = yaml.safe_load(text)["spec"]["pytorchReplicaSpecs"].values()
        pod = rep["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 900
        (c,) = pod["containers"]
        assert {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": "900"} in c["env"]


def test_torchrun_reads_the_shutdown_timeout_variable():
    """The variable the renderings set is the one this torch's launcher reads for the wait
    between forwarding SIGTERM to the ranks and SIGKILLing them (default 30 s)."""
    import os

    from torch.distributed.launcher.api import LaunchConfig

    old = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = "123"
    try:
        cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1)
    finally:
        if old is None:
            del os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]
        else:
            os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = old
    assert cfg.shutdown_timeout == 123


def test_out_is_written_executable(tmp_path, capsys):
    out = tmp_path / "jobs" / "job.sbatch"
    assert main(["launch", "--scheduler", "slurm", "--config", TINY, "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert out.stat().st_mode & 0o111 and out.read_text().startswith("#!/usr/bin/env bash\n")
