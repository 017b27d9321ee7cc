"""alternate: commands run in turn each round; medians and ratios come from each command's last JSON line."""

import json
import shlex
import subprocess
import sys

import pytest

from nin_jax.tools import alternate


def _printer(path, value):
    """A command that appends ``value`` to ``path``, then prints a log line and a JSON line with ``value``."""
    code = f"open({str(path)!r}, 'a').write('{value} '); print('log'); print('{{\"speed\": {value}}}')"
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def test_runs_commands_in_turn_and_reports_medians_and_ratios(tmp_path):
    order = tmp_path / "order"
    commands = alternate.parse_commands([f"a={_printer(order, 10)}", f"b={_printer(order, 25)}"])
    result = alternate.alternate(commands, rounds=3, key="speed", log=lambda *_: None)
    assert order.read_text().split() == ["10", "25"] * 3  # A B A B A B, not A A A B B B
    assert result["runs"] == {"a": [10.0] * 3, "b": [25.0] * 3}
    assert result["medians"] == {"a": 10.0, "b": 25.0}
    assert result["ratio_to_first"] == {"a": 1.0, "b": 2.5}


def test_a_command_without_the_key_fails_with_its_name_and_stderr(tmp_path):
    commands = {"ok": _printer(tmp_path / "o", 1), "broken": f"{shlex.quote(sys.executable)} -c \"import sys; sys.exit('boom')\""}
    with pytest.raises(RuntimeError, match=r"broken \(round 0\) exited with 1(.|\n)*boom"):
        alternate.alternate(commands, rounds=2, key="speed", log=lambda *_: None)


def test_bad_specs_are_refused():
    for specs in (["noequals"], ["=cmd"], ["a= "], ["a=x", "a=y"]):
        with pytest.raises(ValueError):
            alternate.parse_commands(specs)


def test_cli_writes_json(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "nin_jax.tools.alternate", "--rounds=2", "--key=speed",
                           f"--json={out}", f"x={_printer(tmp_path / 'o', 4)}", f"y={_printer(tmp_path / 'o', 2)}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ratio 0.50" in proc.stdout
    assert json.loads(out.read_text())["medians"] == {"x": 4.0, "y": 2.0}
