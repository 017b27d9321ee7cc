"""launch/slurm.sbatch run by bash with stand-ins for srun and scontrol: the training command passes through
unchanged, one task per GPU, and a job that was preempted (exit code 143) requeues itself."""

import os
import re
import subprocess

import pytest

import helpers_reliability as h

SCRIPT = h.REPO / "launch" / "slurm.sbatch"
ARGS = ["--config=configs/imagenet.py:pod", "--workdir=/shared/runs/nin", "--config.run.data_dir=/shared/tfds"]


def test_one_task_per_gpu_and_a_requeue_on_the_time_limit():
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", SCRIPT.read_text(), re.M))
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    assert "gpus-per-task" not in directives and "requeue" in SCRIPT.read_text()
    assert directives["signal"].startswith("TERM@")


@pytest.mark.parametrize("srun_exit,restarts,requeued", [
    (0, "0", False), (143, "0", True), (1, "0", False),
    (75, "0", True), (137, "2", True), (75, "3", False),  # a lost task: requeued at most NIN_MAX_RESTARTS=3 times
])
def test_script_runs_the_training_command(tmp_path, srun_exit, restarts, requeued):
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("export NIN_ACTIVATED=1\n")
    bin_dir.mkdir()
    for name, body in {"srun": f'echo "srun $NIN_ACTIVATED $PWD $*" >> {tmp_path}/calls; exit {srun_exit}',
                       "scontrol": f'echo "scontrol $*" >> {tmp_path}/calls'}.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", NIN_VENV=str(venv), SLURM_JOB_ID="4242",
               SLURM_SUBMIT_DIR=str(h.REPO), SLURM_RESTART_COUNT=restarts)
    proc = subprocess.run(["bash", str(SCRIPT), *ARGS], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == srun_exit, proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == (f"srun 1 {h.REPO} --kill-on-bad-exit=1 --gpu-bind=none python -m nin_jax.main "
                        + " ".join(ARGS))
    assert calls[1:] == (["scontrol requeue 4242"] if requeued else [])
