"""The paper's ablations as named sweeps, and a sequential, resumable sweep runner.

A sweep is a list of points; each point is a set of config overrides (dotted keys such as `model.head`)
trained in its own workdir `<root>/<sweep>/<point>` by the normal training entry, `python -m nin_jax.main`,
run as a subprocess (exactly the command a user would type, so a point behaves as a standalone run).
Rerunning a sweep skips finished points (those with a results.json) and resumes an interrupted point from
its latest checkpoint, which `nin_jax.main` does by itself.

    python launch/sweep.py --sweep=gap_vs_fc --root=/tmp/sweeps --config=configs/digits.py --set=model.width=0.5
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from typing import Any, Callable, Mapping, Sequence

import ml_collections
from etils import epath

from nin_jax import config as config_lib
from nin_jax.config import ConfigError
from nin_jax.runtime import remote

@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep: `overrides` on top of the sweep's base, and the paper's error where it has one."""

    name: str
    label: str  # the "Method" column of the table
    overrides: Mapping[str, Any]
    paper_error: float | None = None  # test error in %, on the paper's dataset (see `Sweep.paper_source`)


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    points: tuple[Point, ...]
    base: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # overrides shared by every point
    paper_source: str = ""  # where `Point.paper_error` comes from

    def point(self, name: str) -> Point:
        for p in self.points:
            if p.name == name:
                return p
        raise ConfigError(f"sweep {self.name!r} has no point {name!r}; choose from {[p.name for p in self.points]}.")


def _depth_blocks(n: int) -> str:
    """`n` 3x3 mlpconv blocks of width 96 (scaled by model.width), max-pooled after all but the last.

    3x3/2 Caffe pooling takes 8 -> 4 -> 2 -> 1 and 32 -> 16 -> 8 -> 4, so up to 4 blocks fit 8x8 digits and
    32x32 images alike; the last block emits the class maps (`C`).
    """
    return ",".join(["3:96-96-96:max"] * (n - 1) + ["3:96-96-C"])


SWEEPS: dict[str, Sweep] = {
    s.name: s
    for s in [
        Sweep(
            "gap_vs_fc",
            "Global average pooling vs a fully connected head on the class maps, without and with dropout "
            "before it (the paper's Table 5; no data augmentation there).",
            (
                Point("fc", "mlpconv + Fully Connected", {"model.head": "fc", "model.fc_dropout": 0.0}, 11.59),
                Point("fc_dropout", "mlpconv + Fully Connected + Dropout",
                      {"model.head": "fc", "model.fc_dropout": 0.5}, 10.88),
                Point("gap", "mlpconv + Global Average Pooling", {"model.head": "gap"}, 10.41),
            ),
            # Table 5 was trained without augmentation; `--set augment.translate=...` turns it back on.
            base={"augment.translate": 0, "augment.flip": False},
            paper_source="Table 5, CIFAR-10 test error without data augmentation",
        ),
        Sweep(
            "mlpconv_vs_conv",
            "1x1 layers per block: 0 is a plain convolution (a linear filter + ReLU), 2 is the paper's mlpconv.",
            (
                Point("mlp0", "conv (0 1x1 layers)", {"model.mlp_layers": 0}),
                Point("mlp1", "mlpconv, 1 1x1 layer", {"model.mlp_layers": 1}),
                Point("mlp2", "mlpconv, 2 1x1 layers (paper)", {"model.mlp_layers": 2}),
            ),
        ),
        Sweep(
            "depth",
            "Number of 3x3 mlpconv blocks (width 96, two 1x1 layers each), valid for 8x8 and 32x32 inputs.",
            tuple(Point(f"blocks{n}", f"{n} mlpconv block{'s' if n > 1 else ''}", {"model.blocks": _depth_blocks(n)})
                  for n in (1, 2, 3, 4)),
        ),
        Sweep(
            "bn",
            "BatchNorm after every layer (not in the paper; the Torch NIN block) vs none.",
            (
                Point("no_bn", "no BatchNorm (paper)", {"model.batch_norm": False}),
                Point("bn", "BatchNorm", {"model.batch_norm": True}),
            ),
        ),
    ]
}


def get_sweep(name: str) -> Sweep:
    if name not in SWEEPS:
        raise ConfigError(f"unknown sweep {name!r}; choose one of {sorted(SWEEPS)}.")
    return SWEEPS[name]


def point_workdir(root: str, sweep: str, point: str) -> str:
    """`<root>/<sweep>/<point>` (root may be a gs:// path)."""
    return str(epath.Path(root) / sweep / point)


def is_finished(workdir: str) -> bool:
    """A point is finished once training wrote its results.json (the last thing it does)."""
    return (epath.Path(workdir) / "results.json").exists()


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """`["model.width=0.5", ...]` (an optional leading `config.` is dropped) -> {"model.width": "0.5"}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("--").removeprefix("config.")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE; write e.g. model.width=0.5.")
        out[key] = value
    return out


def check_keys(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str) -> None:
    """Every dotted key must name an existing config field (a typo would otherwise fail only in the run)."""
    for key in overrides:
        node = config
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                moved = config_lib.moved_field_hint(key)
                if moved is not None:
                    raise ConfigError(f"{where}: config.{key} is now config.{moved}; write {moved}=... instead.")
                raise ConfigError(f"{where}: config has no field {key!r} (from {key}=...); check the spelling.")
            node = node[part]


def point_overrides(sweep: Sweep, point: Point, common: Mapping[str, Any]) -> dict[str, Any]:
    """Sweep base, then the user's common overrides, then the point's own (which the user may not change)."""
    clash = sorted(set(common) & set(point.overrides))
    if clash:
        raise ConfigError(
            f"--set {clash} would override what sweep {sweep.name!r} varies (point {point.name!r}); drop it."
        )
    return {**sweep.base, **common, **point.overrides}


def train_command(config_path: str, workdir: str, overrides: Mapping[str, Any],
                  python: str = sys.executable) -> list[str]:
    """The `python -m nin_jax.main` command line of one point."""
    return [python, "-m", "nin_jax.main", f"--config={config_path}", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items())]  # config_flags parses str(v) by field type


def load_config(config_path: str) -> ml_collections.ConfigDict:
    """The config of `--config=path[:arg]`, loaded as `nin_jax.main` loads it (a file's error is one line)."""
    path, _, arg = config_path.partition(":")
    try:
        return config_lib.load_config_file(path, arg or None)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 — the config file's own code failed: the flag's error, as in nin_jax.main
        raise ConfigError(f"--config={config_path} could not be loaded ({type(e).__name__}: {e}); pass a config "
                          "file (and argument) such as configs/cifar10.py:modern.") from e


def plan(sweep_name: str, root: str, config_path: str, common: Mapping[str, Any] | None = None,
         points: Sequence[str] | None = None, python: str = sys.executable) -> list[tuple[Point, str, list[str]]]:
    """(point, workdir, command) for each selected point, after validating names and override keys."""
    sweep = get_sweep(sweep_name)
    common = dict(common or {})
    selected = [sweep.point(p) for p in points] if points else list(sweep.points)
    config = load_config(config_path)
    check_keys(config, common, "--set")
    out = []
    for p in selected:
        overrides = point_overrides(sweep, p, common)
        check_keys(config, overrides, f"sweep {sweep.name!r} point {p.name!r}")
        workdir = point_workdir(root, sweep.name, p.name)
        out.append((p, workdir, train_command(config_path, workdir, overrides, python)))
    return out


def _run_subprocess(cmd: list[str]) -> int:
    return subprocess.call(cmd)


def run_sweep(sweep_name: str, root: str, config_path: str, common: Mapping[str, Any] | None = None,
              points: Sequence[str] | None = None, *, dry_run: bool = False,
              runner: Callable[[list[str]], int] = _run_subprocess, log: Callable[[str], None] = print) -> int:
    """Runs the points one after another; returns 0, or the exit code of the first point that failed.

    Stopping at a failure (rather than going on) keeps the workers of a TPU VM in lockstep and leaves the
    failed point's checkpoint to resume from on the next run.
    """
    planned = plan(sweep_name, root, config_path, common, points)
    remote.check_access(root, "--root")
    for point, workdir, cmd in planned:
        if is_finished(workdir):
            log(f"[sweep {sweep_name}] {point.name}: finished ({workdir}/results.json exists), skipped")
            continue
        log(f"[sweep {sweep_name}] {point.name}: {shlex.join(cmd)}")
        if dry_run:
            continue
        code = runner(cmd)
        if code != 0:
            log(f"[sweep {sweep_name}] {point.name} failed with exit code {code}; rerun the same command to resume.")
            return code
    return 0
