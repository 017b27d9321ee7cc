"""Compares commands by running them in turn, round after round, and reporting medians and ratios.

    python -m nin_jax.tools.alternate --rounds=5 --key=input/img_per_sec \
        'tfdata=python tfdata_imagenet_input.py /data/jpeg 40' \
        'nin_jax=python -m nin_jax.input_benchmark --config=configs/imagenet.py --config.dataset=image_folder --config.run.data_dir=/data/jpeg --json'

A shared machine's speed drifts by tens of percent within minutes, so two speeds compare only when measured
in one run with the commands alternated (A B A B ...). Each command must print a JSON object on a line of its
own; the last such line is read and ``--key`` taken from it. Ratios are of medians, to the first command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any


def parse_commands(specs: Sequence[str]) -> dict[str, str]:
    """``NAME=COMMAND`` strings -> {name: command}, in order."""
    commands: dict[str, str] = {}
    for spec in specs:
        name, sep, command = spec.partition("=")
        if not sep or not name or not command.strip():
            raise ValueError(f"{spec!r} is not NAME=COMMAND")
        if name in commands:
            raise ValueError(f"command name {name!r} is given twice")
        commands[name] = command
    return commands


def last_json_line(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def alternate(commands: dict[str, str], rounds: int, key: str, log=print) -> dict[str, Any]:
    """Runs ``commands`` (shell command lines) in turn for ``rounds`` rounds; returns each one's values of
    ``key`` per round, their medians and the ratio of each median to the first command's."""
    if rounds < 1 or not commands:
        raise ValueError("need at least one round and one command")
    runs: dict[str, list[float]] = {name: [] for name in commands}
    for r in range(rounds):
        for name, command in commands.items():
            start = time.perf_counter()
            proc = subprocess.run(command, shell=True, capture_output=True, text=True)
            record = last_json_line(proc.stdout)
            if proc.returncode or record is None or key not in record:
                raise RuntimeError(f"{name} (round {r}) exited with {proc.returncode} and printed no JSON line with "
                                   f"{key!r}; its stderr ends:\n{proc.stderr[-2000:]}")
            runs[name].append(float(record[key]))
            log(f"round {r} {name}: {key} = {runs[name][-1]:.4g} ({time.perf_counter() - start:.0f} s)")
    medians = {name: statistics.median(values) for name, values in runs.items()}
    first = medians[next(iter(commands))]
    return {"key": key, "rounds": rounds, "runs": runs, "medians": medians,
            "ratio_to_first": {name: m / first for name, m in medians.items()}}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nin_jax.tools.alternate", description=__doc__.split("\n")[0])
    parser.add_argument("commands", nargs="+", metavar="NAME=COMMAND")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each runs every command once, in order")
    parser.add_argument("--key", default="input/img_per_sec", help="the figure to compare, a key of each JSON line")
    parser.add_argument("--json", help="also write the runs and medians to this file")
    args = parser.parse_args(argv)
    try:
        commands = parse_commands(args.commands)
        result = alternate(commands, args.rounds, args.key)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"alternate: {e}")
    for name, values in result["runs"].items():
        print(f"{name}: median {result['medians'][name]:.4g}  ratio {result['ratio_to_first'][name]:.2f}  "
              f"runs {[round(v, 1) for v in values]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
