"""notebooks/analysis.ipynb executes (nbclient) on a fresh short digits run, and is committed without outputs."""

import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "analysis.ipynb")


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_executes_on_a_fresh_digits_run(tmp_path, monkeypatch):
    workdir = tmp_path / "digits"
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "NIN_JAX_NO_REEXEC": "1"}
    train = subprocess.run(
        [sys.executable, "-m", "nin_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
         "--config.num_train_steps=30", "--config.run.eval_every_steps=30", "--config.run.checkpoint_every_steps=30",
         f"--config.run.cache_dir={tmp_path / 'cache'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]

    monkeypatch.setenv("NIN_JAX_WORKDIR", str(workdir))
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # compile time dominates these tiny shapes
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "nin_digits at step 30" in text and "297 images, top-1" in text
    pictures = [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]
    assert len(pictures) == 3  # curves, class maps, confusion matrix
