"""A tiny 2-point digits sweep shared by the sweep, evaluate and analysis tests (run once per test process).

Points `fc` and `gap` of `gap_vs_fc`, each trained by a real `python -m nin_jax.main` subprocess on the 8 host
devices the test environment sets (XLA_FLAGS is inherited): 12 steps, evaluated and checkpointed at 6 and 12.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(REPO, "configs", "digits.py")


def sweep_cli():
    """launch/sweep.py as a module."""
    from launch import sweep  # pylint: disable=g-import-not-at-top

    return sweep


@functools.cache
def tiny_sweep() -> tuple[str, list[str]]:
    """(sweep root, the launch/sweep.py arguments that made it)."""
    root = tempfile.mkdtemp(prefix="nin_launch_tests_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    argv = ["--sweep=gap_vs_fc", f"--root={root}", f"--config={DIGITS}", "--points=fc,gap",
            f"--set=run.cache_dir={root}/cache", "--set=model.width=0.25", "--set=num_train_steps=12",
            "--set=optim.warmup_epochs=0.1", "--set=run.eval_every_steps=6", "--config.run.checkpoint_every_steps=6",
            "--config.run.log_every_steps=6"]
    previous = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS")
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # as conftest does in-process: compile time dominates
    try:
        code = sweep_cli().main(argv)
    finally:
        if previous is None:
            del os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"]
        else:
            os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = previous
    assert code == 0, f"the tiny sweep failed with exit code {code}"
    return root, argv


def trained_workdir() -> tuple[str, dict]:
    """(workdir, results.json) of the sweep's `gap` point."""
    import json

    workdir = os.path.join(tiny_sweep()[0], "gap_vs_fc", "gap")
    with open(os.path.join(workdir, "results.json")) as f:
        return workdir, json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# A fake Cloud TPU for launch/tpu_vm.py: `gcloud` on PATH records its arguments and simulates the VM's workers as
# directories (their home directories) on this machine. `ssh` runs the command with bash in each worker's home,
# with stand-ins for the VM's tools: `curl` (metadata server, uv installer), `sudo` (recorded, never run), uv
# (refuses an existing virtual environment, as current uv does) and the environment's `python` (prints its
# arguments, runs for FAKE_TPU_ROOT/train_seconds, exits 143 on SIGTERM (or FAKE_TPU_ROOT/term_exit), else with line k of FAKE_TPU_ROOT/train_exit
# at its k-th start on a worker, its last line after that, or 0). With FAKE_TPU_ROOT/drop_connection,
# an ssh that follows a job exits 255 as if the connection dropped. `storage cp` copies into
# FAKE_TPU_ROOT/gcs/<bucket>/... . No network, no real VM.

_FAKE_GCLOUD = r'''#!{python}
import json, os, pathlib, shutil, subprocess, sys

root = pathlib.Path(os.environ["FAKE_TPU_ROOT"])
argv = sys.argv[1:]
with open(root / "gcloud.log", "a") as f:
    f.write(json.dumps(argv) + "\n")
flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
words = [a for a in argv if not a.startswith("--")]
homes = root / "workers"


def workers(spec):
    n = int(os.environ.get("FAKE_TPU_WORKERS", "1"))
    return list(range(n)) if spec == "all" else [int(spec)]


def copy(src, dst):
    dst = pathlib.Path(dst)
    if str(dst).endswith("/") or dst.is_dir():
        dst = dst / pathlib.Path(src).name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)


if words[:1] == ["storage"] and words[1] == "cp":
    src, dst = words[2:4]
    assert dst.startswith("gs://"), dst
    copy(src, root / "gcs" / dst[len("gs://"):])
    sys.exit(0)
group, verb = words[2], words[3]
if verb == "create":
    homes.mkdir()
    for i in workers("all"):
        (homes / f"w{i}").mkdir()
elif verb == "describe":
    print("ACTIVE")
elif verb == "delete":
    shutil.rmtree(homes)
elif verb == "scp":
    src, dst = words[4:6]
    if not homes.exists():
        sys.exit("fake gcloud: no such TPU VM")
    for i in workers(flags["worker"]):
        home = homes / f"w{i}"
        if ":" in src:
            copy(home / src.split(":", 1)[1], dst)
        else:
            copy(src, home / dst.split(":", 1)[1])
elif verb == "ssh":
    if not homes.exists():
        sys.exit("fake gcloud: no such TPU VM")
    code = 0
    for i in workers(flags["worker"]):
        home = homes / f"w{i}"
        env = dict(os.environ, HOME=str(home), FAKE_TPU_WORKER=str(i),
                   PATH=f"{root / 'remote_bin'}:{root / 'bin'}:{os.environ['PATH']}")
        returncode = subprocess.run(["bash", "-c", flags["command"]], cwd=home, env=env).returncode
        code = code or returncode
    dropped = (root / "drop_connection").exists() and "--pid=" in flags["command"]  # while following a job
    sys.exit(255 if dropped else code)
'''

_FAKE_REMOTE_TOOLS = {
    "curl": r'''#!/bin/bash
case "$*" in
  *agent-worker-number*) echo "$FAKE_TPU_WORKER" ;;
  *worker-network-endpoints*) seq -s, -f 'w%g' 0 $((FAKE_TPU_WORKERS - 1)) ;;
  *astral.sh/uv/install.sh*)
    echo 'mkdir -p $HOME/.local/bin && cp $FAKE_TPU_ROOT/remote_bin/uv_impl $HOME/.local/bin/uv' ;;
  *) exit 22 ;;
esac
''',
    "sudo": r'''#!/bin/bash
echo "$*" >> "$FAKE_TPU_ROOT/sudo.log"
''',
    "uv_impl": r'''#!/bin/bash
echo "uv $*" >> "$FAKE_TPU_ROOT/uv.log"
if [ "$1" = venv ]; then
  dir="${@: -1}"
  if [ -e "$dir" ]; then echo "error: A virtual environment already exists at \`$dir\`" >&2; exit 2; fi
  mkdir -p "$dir/bin"
  cp "$FAKE_TPU_ROOT/remote_bin/python_impl" "$dir/bin/python"
  echo "export PATH=$HOME/$dir/bin:\$PATH" > "$dir/bin/activate"
fi
''',
    "python_impl": r'''#!/bin/bash
if [ "$1" = -c ]; then echo "0 4 8 TPU v4"; exit 0; fi
echo "fake python $* (worker $TPU_WORKER_ID of $TPU_WORKER_HOSTNAMES, in $(basename $PWD))"
trap 'echo "got SIGTERM"; exit "$(cat "$FAKE_TPU_ROOT/term_exit" 2>/dev/null || echo 143)"' TERM
end=$(( $(date +%s) + $(cat "$FAKE_TPU_ROOT/train_seconds" 2>/dev/null || echo 0) ))
while [ "$(date +%s)" -lt "$end" ]; do sleep 0.1; done
echo "fake training done"
starts=$(( $(cat "$HOME/fake_starts" 2>/dev/null || echo 0) + 1 )); echo $starts > "$HOME/fake_starts"
code=$(sed -n "${starts}p" "$FAKE_TPU_ROOT/train_exit" 2>/dev/null)
exit "${code:-$(tail -n 1 "$FAKE_TPU_ROOT/train_exit" 2>/dev/null || echo 0)}"
''',
}


def install_fake_tpu(root: str | os.PathLike, workers: int) -> dict[str, str]:
    """Writes the fake gcloud and the workers' tools under `root`; returns the environment to run with."""
    import pathlib
    import stat

    root = pathlib.Path(root)
    files = {root / "bin" / "gcloud": _FAKE_GCLOUD.replace("{python}", sys.executable)}
    files.update({root / "remote_bin" / name: text for name, text in _FAKE_REMOTE_TOOLS.items()})
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return {"FAKE_TPU_ROOT": str(root), "FAKE_TPU_WORKERS": str(workers),
            "PATH": f"{root / 'bin'}:{os.environ['PATH']}"}


def fake_gcloud_calls(root: str | os.PathLike) -> list[list[str]]:
    """Every argument list the fake gcloud was called with, in order."""
    import json
    import pathlib

    path = pathlib.Path(root) / "gcloud.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def launcher_repo(path: str | os.PathLike, files: dict[str, str] | None = None) -> str:
    """A committed repository for launch/tpu_vm.py to ship: requirements.txt, this repository's configs/ (the
    launcher loads them to check --config flags) and `files`; returns its path."""
    import pathlib

    configs = {f"configs/{p.name}": p.read_text() for p in (pathlib.Path(REPO) / "configs").glob("*.py")}
    return make_git_repo(path, {"requirements.txt": "jax==0.10.2\n", **configs, **(files or {})})


def make_git_repo(path: str | os.PathLike, files: dict[str, str]) -> str:
    """A git repository at `path` with `files` committed; returns its path."""
    import pathlib
    import subprocess

    path = pathlib.Path(path)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git = ["git", "-C", str(path), "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "initial"]):
        subprocess.run(git + args, check=True, capture_output=True)
    return str(path)
