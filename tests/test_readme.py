"""The README's two opening commands are the ones CI and users run."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())[:2]


def test_readme_opens_with_a_training_and_a_test_command():
    train_cmd, test_cmd = _readme_commands()
    assert "pip install" in train_cmd and "-m nin_jax.main --config=configs/digits.py" in train_cmd
    assert "pip install" in test_cmd and "-m pytest" in test_cmd


def test_ci_runs_the_readme_test_command_literally():
    _, test_cmd = _readme_commands()
    assert test_cmd in (ROOT / ".ci" / "run").read_text().splitlines()
