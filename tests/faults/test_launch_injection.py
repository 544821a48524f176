"""Hostile values in ``layerfreeze launch`` renderings: nothing injected, nothing mangled.

Every value that reaches a rendered job (the config path, the overrides, the job name, the data
paths, the checkpoint and log directories, the scheduler options, the ``--out`` name echoed in
the header) is set to a hostile string, then:

- Slurm: the rendered script runs under bash with stand-in ``srun`` / ``scontrol`` (and a
  stand-in ``$PYTHON`` for the torchrun line) first on ``PATH``; each records its argv,
  NUL-separated. A canary file that the hostile strings try to create never appears, and each
  value arrives byte-for-byte as one argument where it belongs. ``#SBATCH`` values are read back
  with a port of sbatch's own directive parser (``_get_argument`` in Slurm's
  ``src/sbatch/opt.c``: backslash escapes, single/double quotes, ``#`` starts a comment) and the
  ``--output`` file name with Slurm's ``%`` patterns expanded.
- Kubernetes: the manifest is read with ``yaml.safe_load``; the container command is expanded
  the way the kubelet expands ``$(VAR)`` references (``third_party/forked/golang/expansion``);
  every value round-trips exactly.
- local: the ``--dry-run`` line, split by a POSIX shell parser, is the command that runs.

Control characters (C0, DEL, C1, U+2028/U+2029) in any value are refused with exit 2 and one
line naming the key; nothing is written.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from layerfreeze.cli import main
from tests.helpers.cli import error_line

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/tiny_llama/cpt_freeze_deep_deepspeed.yaml"
CANARY = "CANARY"

#: Each tries to run ``touch CANARY`` or to break quoting in one of the renderings; the last
#: ones carry shell/YAML/Slurm metacharacters, non-ASCII text and leading dashes.
HOSTILE = [
    "with space",
    "$(touch CANARY)",
    "`touch CANARY`",
    "x; touch CANARY",
    "x && touch CANARY",
    "x | touch CANARY",
    "it's'; touch CANARY; '",
    'say "hi"; touch CANARY; "',
    "*?[ab]{c,d}~",
    "数据/中文 路径",
    "-rf",
    "--config",
    "#not-a-comment",
    "%j %x %% 100%",
    "$HOME ${PATH} $$ $(WANDB_MODE) $(PYTHONUNBUFFERED)",
    "> out < in 2>&1 !!",
    "a:b,c=d@e",
]
#: Backslashes are fine everywhere except Slurm's --output (see test_backslash_in_slurm_out_dir).
HOSTILE_ANY = [*HOSTILE, "back\\slash \\$(touch CANARY)", "trailing\\"]

#: control characters the renderings must refuse: C0 (with tab, CR, LF), DEL, C1, and the
#: Unicode line/paragraph separators that YAML and Python's splitlines() treat as line breaks
CONTROL = ["\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\u2028", "\u2029"]

SRUN = r"""#!/usr/bin/env bash
# Stand-in srun: record argv (NUL-separated) and the working directory, then run the step once
# (node 0 of a 1-node allocation) with its options stripped.
printf '%s\0' "$@" >"$STUB_LOGS/srun.argv"
pwd >"$STUB_LOGS/srun.cwd"
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 "$@"
"""
SCONTROL = r"""#!/usr/bin/env bash
printf '%s\0' "$@" >>"$STUB_LOGS/scontrol.argv"
case "$1" in
  show) echo 127.0.0.1 ;;
  *) exit 0 ;;
esac
"""
PYTHON = r"""#!/usr/bin/env bash
# Stand-in $PYTHON for the torchrun line: record argv.
printf '%s\0' "$@" >"$STUB_LOGS/python.argv"
"""


# ---------------------------------------------------------------------------------------------
# independent readers: sbatch's directive parser, Slurm file-name patterns, kubelet expansion


def sbatch_argument(text: str) -> str:
    """One ``#SBATCH`` argument as sbatch reads it (port of ``_get_argument``, Slurm opt.c)."""
    space = " \t\n\v\f\r"
    i, n, out = 0, len(text), []
    while i < n and text[i] in space:
        i += 1
    quoted, q, escape = False, "", False
    while i < n and (quoted or text[i] not in space) and text[i] != "\n":
        c = text[i]
        if escape:
            escape = False
        elif c == "\\":
            escape, i = True, i + 1
            continue
        elif quoted:
            if c == q:
                quoted, i = False, i + 1
                continue
        elif c in "\"'":
            quoted, q, i = True, c, i + 1
            continue
        elif c == "#":
            break
        out.append(c)
        i += 1
    assert not quoted, f"sbatch: unmatched quote in {text!r}"
    assert text[i:].strip() == "" or text[i:].lstrip().startswith("#"), (
        f"sbatch would read a second argument from {text!r}"
    )
    return "".join(out)


def sbatch_options(script: str) -> dict[str, str]:
    opts = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH"):
            key, _, value = sbatch_argument(line[len("#SBATCH") :]).partition("=")
            opts[key] = value
    return opts


def slurm_fname(pattern: str, job_id: str) -> str:
    """Slurm's file-name patterns for the two we render: ``%j`` (job id) and ``%%``."""
    assert "\\" not in pattern  # a backslash would switch every pattern off
    return re.sub(r"%(.)", lambda m: {"j": job_id, "%": "%"}.get(m.group(1), m.group(0)), pattern)


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """How the kubelet expands a container's command/args: ``$(VAR)`` -> value when VAR is
    defined, ``$$`` -> ``$``, anything else unchanged (k8s third_party/forked/golang/expansion)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "$" and i + 1 < n:
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env.get(name, f"$({name})"))
                    i = end + 1
                    continue
                out.append("$(")
                i += 2
                continue
            out.append("$" + nxt)
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def read_argv(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data.endswith(b"\0"), data
    return [a.decode("utf-8") for a in data[:-1].split(b"\0")]


def canaries(root: Path) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f == CANARY]


# ---------------------------------------------------------------------------------------------
# fixtures


def _hostile_tree(tmp_path: Path, h: str, *, slurm: bool) -> tuple[Path, Path, dict]:
    """A working directory named after ``h`` holding a config whose every path is ``h``-based,
    and the data path; returns (workdir, config path relative to it, config values)."""
    workdir = tmp_path / "wd" / h
    workdir.mkdir(parents=True)
    cfg = yaml.safe_load(TINY.read_text())
    values = {
        "logging.out_dir": f"{h}.out",
        "logging.wandb_run_name": h,
        "checkpoint.dir": f"{h}.ckpt",
        "data.paths": [h],
    }
    cfg["logging"]["out_dir"] = values["logging.out_dir"]
    cfg["logging"]["wandb_run_name"] = h
    cfg["checkpoint"]["dir"] = values["checkpoint.dir"]
    cfg["data"]["paths"] = [h]
    cfg["eval"]["at_end"] = False
    (workdir / h).mkdir(parents=True, exist_ok=True)  # the data path exists (the job checks)
    config = Path(f"{h}.yaml")
    (workdir / config).parent.mkdir(parents=True, exist_ok=True)
    (workdir / config).write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return workdir, config, values


def _stubs(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir, logs = tmp_path / "bin", tmp_path / "stub_logs"
    bin_dir.mkdir()
    logs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("python-stub", PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, logs


# ---------------------------------------------------------------------------------------------
# Slurm


@pytest.mark.parametrize("h", HOSTILE, ids=range(len(HOSTILE)))
def test_slurm_script_runs_hostile_values_as_data(tmp_path, monkeypatch, h):
    workdir, config, values = _hostile_tree(tmp_path, h, slurm=True)
    monkeypatch.chdir(workdir)
    override = f"logging.wandb_project={h}"
    out = tmp_path / "jobs" / f"{h}.sbatch"
    argv = ["launch", "--scheduler", "slurm", "--nodes", "1", "--gpus-per-node", "1"]
    # --key=VALUE: a value starting with '-' is the option's value (argparse's rule)
    argv += [f"--config={config}", f"--partition={h}", f"--workdir={workdir}"]
    argv += [f"--out={out}", override]
    assert main(argv) == 0
    script = out.read_text(encoding="utf-8")

    # The header is as many lines as a benign rendering's: no value ended a line.
    monkeypatch.chdir(REPO)
    benign = tmp_path / "benign.sbatch"
    assert (
        main(
            [
                "launch",
                "--scheduler",
                "slurm",
                "--config",
                str(TINY),
                "--partition",
                "p",
                "--workdir",
                "/w",
                "--out",
                str(benign),
                "logging.wandb_project=x",
            ]
        )
        == 0
    )
    assert len(script.splitlines()) == len(benign.read_text().splitlines())

    # sbatch reads the directives back exactly
    opts = sbatch_options(script)
    assert opts["--partition"] == h
    assert slurm_fname(opts["--output"], "4242") == f"{values['logging.out_dir']}/slurm-4242.out"
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", opts["--job-name"]), opts["--job-name"]

    bin_dir, logs = _stubs(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        PYTHON=str(bin_dir / "python-stub"),
        STUB_LOGS=str(logs),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node0",
        SLURM_NNODES="1",
        SLURM_SUBMIT_DIR=str(tmp_path),  # --workdir, not the submit directory, is used
    )
    extra = f"logging.wandb_run_name={h}"  # `sbatch job.sbatch key=value`: more overrides
    proc = subprocess.run(
        ["bash", str(out), extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert canaries(tmp_path) == []  # (a) nothing but the job ran

    train = ["train", f"--config={config}", "checkpoint.resume=auto", override, extra]
    srun = read_argv(logs / "srun.argv")  # (b) each value one argument, byte for byte
    assert srun[srun.index("torchrun") + 1 :] == train, srun
    py = read_argv(logs / "python.argv")
    assert py[:3] == ["-m", "torch.distributed.run", "--nnodes"], py
    assert py[py.index("layerfreeze") + 1 :] == train, py
    assert (logs / "srun.cwd").read_text().rstrip("\n") == str(workdir)
    assert read_argv(logs / "scontrol.argv") == ["show", "hostnames", "node0"]
    # the job created its directories under --workdir with the exact names
    assert (workdir / values["checkpoint.dir"]).is_dir()
    assert (workdir / values["logging.out_dir"]).is_dir()


def test_backslash_in_slurm_out_dir_is_refused(tmp_path, monkeypatch, capsys):
    """A backslash in ``--output`` switches off Slurm's ``%j`` pattern for the whole name: every
    job would append to one literal ``slurm-%j.out``. Refused by name."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "job.sbatch"
    line = error_line(
        capsys,
        [
            "launch",
            "--scheduler",
            "slurm",
            "--config",
            str(TINY),
            "--out",
            str(out),
            "logging.out_dir=runs/a\\b",
        ],
    )
    assert "logging.out_dir" in line and "backslash" in line
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Kubernetes


@pytest.mark.parametrize("h", HOSTILE_ANY, ids=range(len(HOSTILE_ANY)))
def test_pytorchjob_round_trips_hostile_values(tmp_path, monkeypatch, capsys, h):
    workdir, config, values = _hostile_tree(tmp_path, h, slurm=False)
    monkeypatch.chdir(workdir)
    override = f"logging.wandb_project={h}"
    mount = f"/{h}"
    argv = ["launch", "--scheduler", "k8s", "--nodes", "2", f"--config={config}"]
    argv += [f"--image={h}", f"--pvc={h}", f"--workdir={mount}", override]
    assert main(argv) == 0
    text = capsys.readouterr().out
    job = yaml.safe_load(text)
    assert list(job) == ["apiVersion", "kind", "metadata", "spec"]  # nothing injected
    ann = job["metadata"]["annotations"]
    assert ann["layerfreeze/config"] == str(config)
    assert ann["layerfreeze/data"] == h
    assert ann["layerfreeze/checkpoints"] == values["checkpoint.dir"]
    assert ann["layerfreeze/logs"] == values["logging.out_dir"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    train = ["train", f"--config={config}", "checkpoint.resume=auto", override]
    reps = job["spec"]["pytorchReplicaSpecs"]
    assert set(reps) == {"Master", "Worker"}
    for rep in reps.values():
        pod = rep["template"]["spec"]
        (c,) = pod["containers"]
        env = {e["name"]: e["value"] for e in c["env"]}
        command = [kubelet_expand(a, env) for a in c["command"]]
        assert command[command.index("layerfreeze") + 1 :] == train, c["command"]
        assert c["image"] == h
        assert c["workingDir"] == mount
        assert {"name": "workspace", "mountPath": mount} in c["volumeMounts"]
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == [h]


# ---------------------------------------------------------------------------------------------
# local


@pytest.mark.parametrize("h", HOSTILE_ANY, ids=range(len(HOSTILE_ANY)))
def test_local_dry_run_line_is_the_command(tmp_path, monkeypatch, capsys, h):
    from layerfreeze.launcher import build_job, local_command

    workdir, config, _ = _hostile_tree(tmp_path, h, slurm=False)
    monkeypatch.chdir(workdir)
    override = f"logging.wandb_project={h}"
    assert (
        main(["launch", "--scheduler", "local", f"--config={config}", "--dry-run", override]) == 0
    )
    line = capsys.readouterr().out
    assert line.endswith("\n") and line.count("\n") == 1
    cmd = local_command(build_job("local", str(config), [override]), python=sys.executable)
    assert shlex.split(line) == cmd
    assert cmd[cmd.index("layerfreeze") + 1 :] == ["train", f"--config={config}", override]


# ---------------------------------------------------------------------------------------------
# control characters: refused by name, nothing written


def _control_cases():
    cases = []
    for ch in CONTROL:
        name = f"U+{ord(ch):04X}"
        cases += [
            pytest.param("--config", ch, id=f"config-{name}"),
            pytest.param("override", ch, id=f"override-{name}"),
            pytest.param("logging.out_dir", ch, id=f"out_dir-{name}"),
            pytest.param("--workdir", ch, id=f"workdir-{name}"),
            pytest.param("--partition", ch, id=f"partition-{name}"),
            pytest.param("--out", ch, id=f"out-{name}"),
        ]
    for key in ("logging.wandb_run_name", "data.paths[0]", "checkpoint.dir"):
        cases += [pytest.param(key, "\n", id=f"{key}-LF"), pytest.param(key, "\0", id=f"{key}-NUL")]
    cases += [
        pytest.param("--image", "\n", id="image-LF"),
        pytest.param("--pvc", "\r", id="pvc-CR"),
    ]
    return cases


@pytest.mark.parametrize("key,ch", _control_cases())
def test_control_characters_are_refused_by_name(tmp_path, monkeypatch, capsys, key, ch):
    monkeypatch.chdir(tmp_path)
    bad = f"a{ch}touch {CANARY}"
    cfg = yaml.safe_load(TINY.read_text())
    cfg["eval"]["at_end"] = False
    config = "run.yaml"
    scheduler = "k8s" if key in ("--image", "--pvc") else "slurm"
    out = tmp_path / "job.out"
    extra: list[str] = []
    expect = key
    if key == "--config":
        config = f"run{ch}.yaml"
    elif key == "override":
        extra = [f"logging.wandb_project={bad}"]
        expect = "logging.wandb_project"
    elif key.startswith("--") and key != "--out":
        extra = [key, f"/{bad}"]
    elif key == "--out":
        out = tmp_path / f"job{ch}.out"
    elif key == "data.paths[0]":
        cfg["data"]["paths"] = ["ok", bad]
        expect = "data.paths[1]"
    else:
        section, field = key.split(".")
        cfg[section][field] = bad
    (tmp_path / config).write_text(yaml.safe_dump(cfg), encoding="utf-8")
    line = error_line(
        capsys, ["launch", "--scheduler", scheduler, "--config", config, "--out", str(out), *extra]
    )
    assert f"{expect}:" in line and "control character" in line, line
    assert f"U+{ord(ch):04X}" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == [config]  # nothing written


@pytest.mark.parametrize("render", ["slurm", "k8s"])
def test_renderers_refuse_control_characters_from_the_api(render):
    """``render_slurm`` / ``render_pytorchjob`` check a hand-built JobSpec too."""
    from layerfreeze.errors import ConfigError
    from layerfreeze.launcher import JobSpec, render_pytorchjob, render_slurm

    job = JobSpec(
        name="ok",
        config="c.yaml",
        overrides=["logging.wandb_project=a\nb"],
        nodes=1,
        gpus_per_node=1,
        data_paths=[],
        checkpoint_dir="ck",
        out_dir="o",
    )
    fn = render_slurm if render == "slurm" else render_pytorchjob
    with pytest.raises(ConfigError, match="logging.wandb_project: .*control character"):
        fn(job)


@pytest.mark.parametrize(
    "rank_status,exit_line,expected",
    [(0, "", 0), (3, "", 3), (1, "rank 0: 75 stopped by SIGTERM after step 7", 75)],
    ids=["done", "failed", "stopped-by-signal"],
)
def test_slurm_job_status_comes_from_the_exit_file(
    tmp_path, monkeypatch, rank_status, exit_line, expected
):
    # torchrun turns a rank's 75 into 1: the rendered job reads $LAYERFREEZE_EXIT_FILE instead.
    monkeypatch.chdir(REPO)
    out = tmp_path / "job.sbatch"
    assert (
        main(
            [
                "launch",
                "--scheduler",
                "slurm",
                "--config",
                str(TINY),
                f"--workdir={tmp_path}",
                f"--out={out}",
                f"logging.out_dir={tmp_path / 'logs'}",
            ]
        )
        == 0
    )
    bin_dir, logs = _stubs(tmp_path)
    rank = bin_dir / "python-rank"
    rank.write_text(
        "#!/usr/bin/env bash\n"
        f'[ -z {shlex.quote(exit_line)} ] || echo {shlex.quote(exit_line)} >>"$LAYERFREEZE_EXIT_FILE"\n'
        f"exit {rank_status}\n"
    )
    rank.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        PYTHON=str(rank),
        STUB_LOGS=str(logs),
        SLURM_JOB_ID="77",
        SLURM_JOB_NODELIST="node0",
        SLURM_NNODES="1",
    )
    proc = subprocess.run(
        ["bash", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == expected, proc.stderr
    assert ("exit 75" in proc.stderr) is (expected == 75)
    exit_file = tmp_path / "logs" / ".layerfreeze-exit.77"
    assert exit_file.read_text() == (exit_line + "\n" if exit_line else "")
