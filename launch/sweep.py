"""Runs a named ablation sweep point after point: `python launch/sweep.py --sweep=gap_vs_fc --root=R --config=C`.

Each point trains with `python -m nin_jax.main --config=C --workdir=R/<sweep>/<point> --config.<key>=<value>...`
(a subprocess per point). Overrides for every point: `--set model.width=0.5` (repeatable) or, equivalently,
`--config.model.width=0.5`. Finished points are skipped and an interrupted point resumes, so rerunning the same
command continues a sweep. `--list` prints the sweeps and their points.
"""

from __future__ import annotations

import argparse
import sys

from nin_jax.config import ConfigError
from nin_jax.tools import sweeps


def _describe() -> str:
    lines = []
    for s in sweeps.SWEEPS.values():
        lines.append(f"{s.name}: {s.description}")
        base = ", ".join(f"{k}={v}" for k, v in s.base.items())
        if base:
            lines.append(f"    every point: {base}")
        for p in s.points:
            paper = f"  [paper: {p.paper_error}% error]" if p.paper_error is not None else ""
            lines.append(f"    {p.name:<12} {', '.join(f'{k}={v}' for k, v in p.overrides.items())}{paper}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", help=f"one of {sorted(sweeps.SWEEPS)}")
    parser.add_argument("--root", help="sweep root (local or gs://); point workdirs are <root>/<sweep>/<point>")
    parser.add_argument("--config", help="training config file, e.g. configs/digits.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every point (repeatable), e.g. model.width=0.5")
    parser.add_argument("--points", default="", help="comma-separated subset of the sweep's points")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--list", action="store_true", help="list the sweeps and exit")
    args, rest = parser.parse_known_args(argv)
    if args.list:
        print(_describe())
        return 0
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    missing = [f"--{k}" for k in ("sweep", "root", "config") if not getattr(args, k)]
    if missing:
        parser.error(f"{', '.join(missing)} required (see --list for the sweeps)")
    try:
        common = sweeps.parse_overrides(args.set + [a.removeprefix("--") for a in rest])
        points = [p.strip() for p in args.points.split(",") if p.strip()]
        return sweeps.run_sweep(args.sweep, args.root, args.config, common, points, dry_run=args.dry_run)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
