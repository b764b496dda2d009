"""The launch scripts' dry runs print the right commands; the Colab notebook is valid."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the launch scripts need bash")


def _run(script, *args, env=None):
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def _commands(stdout):
    """The numbered lines `[n] command`, in order."""
    lines = [line for line in stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in lines] == [f"[{i}" for i in range(1, len(lines) + 1)]
    return [line.split("] ", 1)[1] for line in lines]


TPU_FLAGS = [
    "--project=proj",
    "--zone=us-west4-a",
    "--tpu_name=cot",
    "--accelerator_type=v5litepod-64",
    "--config=configs/default.py",
    "--workdir=gs://bkt/runs/d12",
    "--repo=https://example.com/cotlab_jax.git",
]


def test_tpu_pod_dry_run_creates_installs_and_runs_on_all_workers():
    result = _run(
        "tpu_pod.sh",
        *TPU_FLAGS,
        "--dry_run",
        "--",
        "--config.model.num_hidden_layers=12",
        "--config.mesh.fsdp=-1",
    )
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    assert "tpu-vm describe cot --project=proj --zone=us-west4-a" in commands[0]
    assert commands[1].startswith("gcloud compute tpus tpu-vm create cot ")
    assert "--accelerator-type=v5litepod-64 --version=v2-alpha-tpuv5-lite" in commands[1]
    ssh = [c for c in commands if " ssh cot " in c]
    assert all("--worker=all" in c for c in ssh)
    assert any("git clone https://example.com/cotlab_jax.git" in c for c in ssh)
    assert any("gcsfuse" in c and "bkt $HOME/gcs/bkt" in c for c in ssh)
    assert any('pip install -q -e ".[tpu]"' in c for c in ssh)
    main = ssh[-1]
    assert main == commands[-1]
    assert (
        "-m cotlab_jax.main --config=configs/default.py --workdir=$HOME/gcs/bkt/runs/d12 "
        "--config.model.num_hidden_layers=12 --config.mesh.fsdp=-1"
    ) in main
    assert "after a preemption" in result.stdout


def test_tpu_pod_dry_run_queued_spot_and_local_source():
    flags = [f for f in TPU_FLAGS if not f.startswith(("--repo", "--workdir"))]
    result = _run(
        "tpu_pod.sh",
        *flags,
        "--workdir=/mnt/nfs/run",
        f"--src={LAUNCH.parent}",
        "--queued",
        "--spot",
        "--dry_run",
    )
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    assert commands[1].startswith("gcloud compute tpus queued-resources create cot --node-id=cot ")
    assert commands[1].endswith("--runtime-version=v2-alpha-tpuv5-lite --spot")
    assert any(c.startswith("tar -czf") and "--exclude=.venv" in c for c in commands)
    assert any(" scp " in c and "--worker=all" in c for c in commands)
    assert not any("gcsfuse" in c for c in commands)
    assert "--workdir=/mnt/nfs/run" in commands[-1]


@pytest.mark.parametrize(
    "missing",
    ["--project", "--zone", "--tpu_name", "--accelerator_type", "--config", "--workdir", "--repo"],
)
def test_tpu_pod_missing_flag(missing):
    result = _run(
        "tpu_pod.sh", *[f for f in TPU_FLAGS if not f.startswith(missing + "=")], "--dry_run"
    )
    assert result.returncode != 0
    assert (missing if missing != "--repo" else "--src") in result.stderr
    assert result.stdout == ""


def test_tpu_pod_bad_flag_prints_usage():
    result = _run("tpu_pod.sh", "--bogus")
    assert result.returncode != 0
    assert "unknown argument: --bogus" in result.stderr and "--accelerator_type" in result.stdout


def test_gpu_multinode_dry_run_sets_coordinator_per_host():
    result = _run(
        "gpu_multinode.sh",
        "--hosts=g0,g1,g2",
        "--config=configs/default.py",
        "--workdir=/shared/run",
        "--port=7000",
        "--dry_run",
        "--",
        "--config.mesh.fsdp=4",
    )
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    assert len(commands) == 3
    for i, (host, command) in enumerate(zip(["g0", "g1", "g2"], commands, strict=True)):
        assert command.startswith(f"ssh -tt {host} ")
        assert (
            f"-m cotlab_jax.main --coordinator_address=g0:7000 --num_processes=3 "
            f"--process_id={i} --config=configs/default.py --workdir=/shared/run "
            "--config.mesh.fsdp=4"
        ) in command


@pytest.mark.parametrize("missing", ["--hosts", "--config", "--workdir"])
def test_gpu_multinode_missing_flag(missing):
    flags = ["--hosts=g0,g1", "--config=configs/default.py", "--workdir=/shared/run", "--dry_run"]
    result = _run("gpu_multinode.sh", *[f for f in flags if not f.startswith(missing + "=")])
    assert result.returncode != 0 and missing in result.stderr


def test_slurm_dry_run(tmp_path):
    scontrol = tmp_path / "scontrol"  # stands in for SLURM's, which expands the node list
    scontrol.write_text("#!/bin/sh\necho node017\necho node018\n")
    scontrol.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4100",
        "SLURM_JOB_NODELIST": "node[017-018]",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_GPUS_ON_NODE": "8",
    }
    result = _run(
        "slurm_gpu.sbatch",
        "--config=configs/default.py",
        "--workdir=/shared/run",
        "--dry_run",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert f"JAX_COORDINATOR_ADDRESS=node017:{4100 % 4096 + 61440}" in result.stdout
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in result.stdout
    assert _commands(result.stdout) == [
        "srun --kill-on-bad-exit=1 .venv/bin/python -m cotlab_jax.main "
        "--config=configs/default.py --workdir=/shared/run --multihost"
    ]


def test_slurm_needs_flags_and_a_job():
    result = _run("slurm_gpu.sbatch", "--workdir=/shared/run", env={"SLURM_JOB_ID": "1"})
    assert result.returncode != 0 and "--config is required" in result.stderr
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    result = subprocess.run(
        ["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--config=c", "--workdir=w"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode != 0 and "sbatch" in result.stderr


def test_colab_notebook_is_valid():
    notebook = json.loads((LAUNCH / "colab.ipynb").read_text())
    assert notebook["nbformat"] == 4
    code = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    for source in code:  # IPython's `!`/`%` lines are not Python
        python = "\n".join(
            line for line in source.splitlines() if not line.lstrip().startswith(("!", "%"))
        )
        compile(python, "colab.ipynb", "exec")
    text = "\n".join(code)
    assert "jax.devices()" in text and "configs/quickstart.py" in text
    assert "summary.md" in text and "accuracy_vs_steps" in text  # the quickstart's report
