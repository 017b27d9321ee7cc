"""Pictures and tables of trained runs.

    python -m nin_jax.analysis class_maps --workdir=W --out=maps.png [--num_images=6]
    python -m nin_jax.analysis sweep --root=R --out=table.md --plot=bars.png

`class_maps` draws, for the first eval images, the image beside the per-class confidence maps of the last
mlpconv layer (the paper's Figure 4); the true class is framed green, the predicted one red. `sweep` tabulates
the final metrics of every point under a sweep root (`R/<sweep>/<point>/results.json`, or `R/<point>/...`
for one sweep's directory) paper-style, beside the paper's number where it has one, and draws them as bars.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display

import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402
from matplotlib import patches  # noqa: E402

from nin_jax.config import ConfigError  # noqa: E402
from nin_jax.cpu import hostenv  # noqa: E402
from nin_jax.tools import evaluate, sweeps  # noqa: E402

CELL_INCHES = 1.1  # one image or class map
HEADER_INCHES = 0.4  # the figure title
DPI = 100
MAX_MAP_COLUMNS = 10  # with more classes, the top-scoring ones (always including the true class)


def class_maps_figure_pixels(num_images: int, num_maps: int) -> tuple[int, int]:
    """(width, height) in pixels of the class-map figure: one row per image, the image then `num_maps` maps."""
    return (round((1 + num_maps) * CELL_INCHES * DPI), round((num_images * CELL_INCHES + HEADER_INCHES) * DPI))


def _shown_classes(logits: np.ndarray, label: int) -> list[int]:
    """All classes, or the top-scoring MAX_MAP_COLUMNS with the true class among them, best first."""
    if logits.shape[0] <= MAX_MAP_COLUMNS:
        return list(range(logits.shape[0]))
    top = [int(c) for c in np.argsort(-logits)[:MAX_MAP_COLUMNS]]
    if label not in top:
        top[-1] = label
    return top


def _frame(ax: Any, color: str) -> None:
    ax.add_patch(patches.Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, edgecolor=color, linewidth=4,
                                   clip_on=False))


def class_maps(workdir: str, out: str, *, num_images: int = 6, split: str | None = None,
               checkpoint: str = "latest", data_dir: str | None = None) -> dict[str, Any]:
    """Draws the class maps of the first `num_images` eval images to the PNG `out`; returns what it drew.

    Runs in one process (it reads the first eval batch back to the host).
    """
    if num_images < 1:
        raise ConfigError(f"--num_images={num_images} must be >= 1.")
    config = evaluate.load_saved_config(workdir)
    if data_dir is not None:
        config.data_dir = data_dir
    r = evaluate.restore(workdir, checkpoint=checkpoint, config=config)
    batches = r.pipeline.eval_batches(split, with_raw=True)
    first = next(batches)
    batches.close()  # one batch is enough; stops the prefetch thread
    n = min(num_images, int(np.asarray(first["mask"]).sum()))
    images = np.asarray(first["image"])[:n]
    raw, labels = np.asarray(first["raw"])[:n], np.asarray(first["label"])[:n]
    apply = jax.jit(functools.partial(r.model.apply, train=False, return_class_maps=True))
    logits, maps = jax.device_get(apply(r.variables, images))
    names = r.pipeline.info.class_names
    if maps.shape[-1] != len(names):
        raise ConfigError(
            f"{workdir} trained model.head={r.config.model.head!r} with "
            f"model.fc_input={r.config.model.fc_input!r}: its last layer has {maps.shape[-1]} channels, not one "
            f"map per class ({len(names)}); class maps need head='gap' or fc_input='class_maps'."
        )

    num_maps = min(len(names), MAX_MAP_COLUMNS)
    width, height = class_maps_figure_pixels(n, num_maps)
    fig, axes = plt.subplots(n, 1 + num_maps, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    top = 1 - HEADER_INCHES / (height / DPI)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top - 0.03, wspace=0.08, hspace=0.45)
    fig.suptitle(f"{r.config.model.arch} ({r.config.model.head}), step {r.step}: class maps of the last mlpconv "
                 "layer (green: true, red: predicted)", fontsize=9, y=0.995)
    drawn = []
    for i in range(n):
        pred, label = int(np.argmax(logits[i])), int(labels[i])
        image = raw[i]
        ax = axes[i, 0]
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", interpolation="nearest")
        ax.set_title(f"true {names[label]}\npred {names[pred]}", fontsize=7, color="green" if pred == label else "red")
        shown = _shown_classes(logits[i], label)
        row = maps[i][..., shown]
        lo, hi = float(min(row.min(), 0.0)), float(max(row.max(), 1e-6))  # one colour scale per image
        for j, c in enumerate(shown, start=1):
            ax = axes[i, j]
            ax.imshow(maps[i][..., c], cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(f"{names[c]}\n{logits[i][c]:.2f}", fontsize=7)
            if c == label:
                _frame(ax, "limegreen")
            if c == pred and pred != label:
                _frame(ax, "red")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        drawn.append({"true": names[label], "pred": names[pred], "classes": [names[c] for c in shown]})
    path = epath.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    plt.close(fig)
    return {"out": out, "step": r.step, "size": (width, height), "images": drawn}


# ---------------------------------------------------------------------------------------------------- sweeps


@dataclasses.dataclass
class PointResult:
    sweep: str
    point: str
    label: str
    status: str  # finished | unfinished (checkpoint N) | no checkpoint | not run
    paper_error: float | None = None
    results: dict | None = None

    @property
    def error(self) -> float | None:
        top1 = (self.results or {}).get("eval/top1")
        return None if top1 is None else 100.0 * (1.0 - top1)


def _latest_checkpoint_step(workdir: epath.Path) -> int | None:
    ckpts = workdir / "checkpoints"
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []
    return max(steps) if steps else None


def _point_result(sweep: str, name: str, workdir: epath.Path) -> PointResult:
    known = sweeps.SWEEPS.get(sweep)
    point = next((p for p in known.points if p.name == name), None) if known else None
    label, paper = (point.label, point.paper_error) if point else (name, None)
    if (workdir / "results.json").exists():
        return PointResult(sweep, name, label, "finished", paper, json.loads((workdir / "results.json").read_text()))
    if not workdir.exists():
        return PointResult(sweep, name, label, "not run", paper)
    step = _latest_checkpoint_step(workdir)
    status = "no checkpoint" if step is None else f"unfinished (checkpoint {step})"
    return PointResult(sweep, name, label, status, paper)


def _is_sweep_dir(path: epath.Path) -> bool:
    return path.name in sweeps.SWEEPS or any((c / "results.json").exists() for c in path.iterdir() if c.is_dir())


def collect_sweeps(root: str) -> dict[str, list[PointResult]]:
    """{sweep: point results} under `root`, in each known sweep's point order (unknown points after, by name)."""
    path = epath.Path(root)
    if not path.is_dir():
        raise ConfigError(f"--root={root} is not a directory; pass the --root a sweep was run with.")
    dirs = [path] if _is_sweep_dir(path) else sorted((c for c in path.iterdir() if c.is_dir()), key=lambda c: c.name)
    out = {}
    for d in dirs:
        present = sorted(c.name for c in d.iterdir() if c.is_dir())
        known = [p.name for p in sweeps.SWEEPS[d.name].points] if d.name in sweeps.SWEEPS else []
        names = known + [p for p in present if p not in known]
        out[d.name] = [_point_result(d.name, n, d / n) for n in names]
    out = {k: v for k, v in out.items() if any(p.status != "not run" for p in v)}
    if not out:
        raise ConfigError(
            f"no sweep points under --root={root} (expected <root>/<sweep>/<point>/results.json); "
            f"run one with launch/sweep.py (sweeps: {sorted(sweeps.SWEEPS)})."
        )
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _setup_line(points: list[PointResult]) -> str:
    done = [p for p in points if p.results]
    if not done:
        return "no point has finished yet"
    r = done[0].results
    c, m, a = r.get("config", {}), r.get("config", {}).get("model", {}), r.get("config", {}).get("augment", {})
    return (f"dataset `{c.get('dataset')}` (train `{c.get('train_split')}`, eval `{c.get('eval_split')}`, "
            f"{r.get('eval/num_examples')} eval examples), arch `{m.get('arch')}`, width {m.get('width')}, "
            f"batch_norm {m.get('batch_norm')}, augment translate {a.get('translate')} flip {a.get('flip')}, "
            f"{r.get('step')} steps of batch {c.get('batch_size')}")


def sweep_table(results: dict[str, list[PointResult]]) -> str:
    """A markdown table per sweep: method, error %, the paper's error %, top-1, top-5, params, steps, status."""
    lines = []
    for sweep, points in results.items():
        known = sweeps.SWEEPS.get(sweep)
        lines.append(f"### {sweep}" + (f": {known.description}" if known else ""))
        lines.append("")
        lines.append(f"Setup: {_setup_line(points)}.")
        if known and known.paper_source:
            lines.append(f"Paper: {known.paper_source} (a full-size NIN trained to convergence).")
        lines.append("")
        lines.append("| Method | point | error % | paper error % | top-1 | top-5 | params | steps | wall min | status"
                     " |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for p in points:
            r = p.results or {}
            minutes = r["wall_seconds"] / 60 if "wall_seconds" in r else None
            lines.append(
                f"| {p.label} | {p.point} | {_fmt(p.error, '.2f')} | {_fmt(p.paper_error, '.2f')} | "
                f"{_fmt(r.get('eval/top1'), '.4f')} | {_fmt(r.get('eval/top5'), '.4f')} | "
                f"{_fmt(r.get('num_params'), ',d')} | {_fmt(r.get('step'), 'd')} | {_fmt(minutes, '.1f')} | "
                f"{p.status} |"
            )
        lines.append("")
    return "\n".join(lines)


def sweep_plot(results: dict[str, list[PointResult]], out: str) -> None:
    """Bars of each point's error %, with the paper's error beside it where the paper has one."""
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), dpi=DPI, squeeze=False)
    for ax, (sweep, points) in zip(axes[0], results.items()):
        x = np.arange(len(points))
        ours = [p.error if p.error is not None else 0.0 for p in points]
        has_paper = any(p.paper_error is not None for p in points)
        w = 0.38 if has_paper else 0.6
        bars = ax.bar(x - (w / 2 if has_paper else 0), ours, w, label="this run", color="tab:blue")
        for b, p in zip(bars, points):
            ax.annotate("n/a" if p.error is None else f"{p.error:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        if has_paper:
            paper = [p.paper_error or 0.0 for p in points]
            pbars = ax.bar(x + w / 2, paper, w, label="paper (CIFAR-10)", color="lightgray", hatch="//",
                           edgecolor="gray")
            for b, p in zip(pbars, points):
                if p.paper_error is not None:
                    ax.annotate(f"{p.paper_error:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=7)
            ax.legend(fontsize=7, loc="upper center", ncol=2)
        top = max([v for p in points for v in (p.error, p.paper_error) if v is not None], default=1.0)
        ax.set_ylim(0, top * 1.3)  # headroom for the value labels and the legend
        ax.set_xticks(x, [p.point for p in points], fontsize=8)
        ax.set_ylabel("error %")
        ax.set_title(sweep, fontsize=10)
    fig.tight_layout()
    path = epath.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cm = sub.add_parser("class_maps", help="class confidence maps of a few eval images (paper Figure 4)")
    cm.add_argument("--workdir", required=True)
    cm.add_argument("--out", required=True, help="PNG file")
    cm.add_argument("--num_images", type=int, default=6)
    cm.add_argument("--split", default=None, help="default: the run's config.eval_split")
    cm.add_argument("--checkpoint", default="latest", help=evaluate.CHECKPOINT_CHOICES)
    cm.add_argument("--data_dir", default=None, help="replaces the saved config.data_dir")
    sw = sub.add_parser("sweep", help="table and bar chart of a sweep's points")
    sw.add_argument("--root", required=True, help="the sweep root (or one sweep's directory under it)")
    sw.add_argument("--out", default=None, help="markdown file for the table (it is printed as well)")
    sw.add_argument("--plot", default=None, help="PNG file for the bar chart")
    args = parser.parse_args(argv)
    try:
        if args.command == "class_maps":
            hostenv.prepare(evaluate.load_saved_config(args.workdir))  # before jax's backends start, as in training
            drawn = class_maps(args.workdir, args.out, num_images=args.num_images, split=args.split,
                               checkpoint=args.checkpoint, data_dir=args.data_dir)
            print(json.dumps(drawn))
        else:
            results = collect_sweeps(args.root)
            table = sweep_table(results)
            print(table)
            if args.out:
                epath.Path(args.out).write_text(table)
            if args.plot:
                sweep_plot(results, args.plot)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
