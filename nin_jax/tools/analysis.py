"""Pictures and tables of trained runs.

    python -m nin_jax.analysis class_maps --workdir=W --out=maps.png [--num_images=6] [--overlay]
    python -m nin_jax.analysis class_maps --workdir=W --images A.jpg B.jpg --out=maps.png [--overlay]
    python -m nin_jax.analysis curves --workdir=W1 --workdir=W2 --out=curves.png
    python -m nin_jax.analysis sweep --root=R --out=table.md --plot=bars.png

`class_maps` draws, for the first eval images (or the `--images` given), the image beside the per-class
confidence maps of the last mlpconv layer (the paper's Figure 4); the true class is framed green, the
predicted one red. `--overlay` draws each map upsampled (bilinear) over its image instead, the usual way to
read class activation maps. `curves` plots train/eval loss and top-1 against step from each workdir's
metrics.jsonl, one colour per run. `sweep` tabulates the final metrics of every point under a sweep root
(`R/<sweep>/<point>/results.json`, or `R/<point>/...` for one sweep's directory) paper-style, beside the
paper's number where it has one, and draws them as bars.

Figures are built with matplotlib's object API (no pyplot state, no backend switch): the functions that
draw return a `matplotlib.figure.Figure`, which notebooks display and `save_png` writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Sequence

import numpy as np
from etils import epath
from matplotlib import patches
from matplotlib.figure import Figure
from PIL import Image

from nin_jax.config import ConfigError
from nin_jax.cpu import hostenv
from nin_jax.tools import evaluate, restore, sweeps

CELL_INCHES = 1.1  # one image or class map
HEADER_INCHES = 0.4  # the figure title
DPI = 100
MAX_MAP_COLUMNS = 10  # with more classes, the top-scoring ones (always including the true class)
OVERLAY_ALPHA = 0.5
CURVE_PANELS = (("loss", ("train/loss", "eval/loss")), ("top-1", ("train/top1", "eval/top1")))


def save_png(fig: Figure, out: str) -> None:
    """Writes `fig` as a PNG to `out` (local or gs://), creating its folder."""
    path = epath.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=DPI)


def class_maps_figure_pixels(num_images: int, num_maps: int) -> tuple[int, int]:
    """(width, height) in pixels of the class-map figure: one row per image, the image then `num_maps` maps."""
    return (round((1 + num_maps) * CELL_INCHES * DPI), round((num_images * CELL_INCHES + HEADER_INCHES) * DPI))


def _shown_classes(logits: np.ndarray, label: int | None) -> list[int]:
    """All classes, or the top-scoring MAX_MAP_COLUMNS with the true class among them, best first."""
    if logits.shape[0] <= MAX_MAP_COLUMNS:
        return list(range(logits.shape[0]))
    top = [int(c) for c in np.argsort(-logits)[:MAX_MAP_COLUMNS]]
    if label is not None and label not in top:
        top[-1] = label
    return top


def _frame(ax: Any, color: str) -> None:
    ax.add_patch(patches.Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, edgecolor=color, linewidth=4,
                                   clip_on=False))


def upsample(class_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """A [h, w] map resized to [height, width] (bilinear), to lay over its image."""
    return np.asarray(Image.fromarray(np.asarray(class_map, np.float32), mode="F").resize((width, height),
                                                                                          Image.BILINEAR))


OVERLAY_MIN_PIXELS = 112  # maps over small images are upsampled to at least this size, for a smooth picture


def _show_image(ax: Any, image: np.ndarray) -> None:
    h, w = image.shape[:2]
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest", extent=(0, w, h, 0))


def _show_overlay(ax: Any, image: np.ndarray, class_map: np.ndarray, lo: float, hi: float) -> None:
    h, w = image.shape[:2]
    scale = max(1.0, OVERLAY_MIN_PIXELS / max(h, w))
    _show_image(ax, image)
    ax.imshow(upsample(class_map, round(h * scale), round(w * scale)), cmap="jet", vmin=lo, vmax=hi,
              alpha=OVERLAY_ALPHA, interpolation="nearest", extent=(0, w, h, 0))


def class_maps_figure(images: np.ndarray, logits: np.ndarray, maps: np.ndarray, class_names: Sequence[str], *,
                      labels: Sequence[int] | None = None, names: Sequence[str] | None = None,
                      overlay: bool = False, title: str = "") -> tuple[Figure, list[dict]]:
    """One row per image: the uint8 image [H, W, C], then its class maps (top MAX_MAP_COLUMNS classes).

    With `labels` the true class is framed green and a wrong prediction red; without, the prediction is
    framed red. `overlay` lays each map, upsampled to the image, over it. Returns (figure, what each row shows).
    """
    n = len(images)
    num_maps = min(len(class_names), MAX_MAP_COLUMNS)
    width, height = class_maps_figure_pixels(n, num_maps)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    axes = fig.subplots(n, 1 + num_maps, squeeze=False)
    top = 1 - HEADER_INCHES / (height / DPI)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top - 0.03, wspace=0.08, hspace=0.45)
    fig.suptitle(title, fontsize=9, y=0.995)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    drawn = []
    for i in range(n):
        pred = int(np.argmax(logits[i]))
        label = None if labels is None else int(labels[i])
        image = images[i]
        ax = axes[i, 0]
        _show_image(ax, image)
        if label is None:
            head = f"{names[i]}\n" if names is not None else ""
            ax.set_title(f"{head}pred {class_names[pred]} {100 * probs[i][pred]:.0f}%", fontsize=7)
        else:
            ax.set_title(f"true {class_names[label]}\npred {class_names[pred]}", fontsize=7,
                         color="green" if pred == label else "red")
        shown = _shown_classes(logits[i], label)
        row = maps[i][..., shown]
        lo, hi = float(min(row.min(), 0.0)), float(max(row.max(), 1e-6))  # one colour scale per image
        for j, c in enumerate(shown, start=1):
            ax = axes[i, j]
            if overlay:
                _show_overlay(ax, image, maps[i][..., c], lo, hi)
            else:
                ax.imshow(maps[i][..., c], cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(f"{class_names[c]}\n{logits[i][c]:.2f}", fontsize=7)
            if c == label:
                _frame(ax, "limegreen")
            if c == pred and pred != label:
                _frame(ax, "red")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        row_info = {"pred": class_names[pred], "classes": [class_names[c] for c in shown]}
        if label is not None:
            row_info["true"] = class_names[label]
        if names is not None:
            row_info["image"] = names[i]
        drawn.append(row_info)
    return fig, drawn


def class_maps(workdir: str, out: str | None, *, num_images: int = 6, split: str | None = None,
               checkpoint: str = "latest", data_dir: str | None = None, images: Sequence[Any] | None = None,
               overlay: bool = False) -> dict[str, Any]:
    """Draws class maps to the PNG `out`: of the first `num_images` eval images, or of `images` (paths or
    uint8 arrays of any size, brought to the model's input as `predict` does). Returns what it drew, and the
    figure under "figure" (for notebooks; `out=None` writes no file).

    The eval-split mode runs in one process (it reads the first eval batch back to the host).
    """
    if images is None and num_images < 1:
        raise ConfigError(f"--num_images={num_images} must be >= 1.")
    if images is not None:
        images = list(images)
        if not images:
            raise ConfigError("--images: no images given.")
        for image in images:
            if not isinstance(image, np.ndarray):
                restore.check_image_file(image)
    if out is not None:
        restore.check_output_path(out)
    if images is not None:
        run = restore.load_run(workdir, checkpoint, data_dir=data_dir)
        result = run.outputs(images)
        raw, labels = result["images"], None
        names = [os.path.basename(str(im)) if not isinstance(im, np.ndarray) else f"image {k}"
                 for k, im in enumerate(images)]
    else:
        run, pipeline = evaluate.restore_for_evaluation(workdir, checkpoint=checkpoint, data_dir=data_dir)
        batches = evaluate.eval_batches(pipeline, split, with_raw=True)
        first = next(batches)
        batches.close()  # one batch is enough; stops the prefetch thread
        n = min(num_images, int(np.asarray(first["mask"]).sum()))
        result = run.forward(np.asarray(first["image"])[:n])
        raw, labels = np.asarray(first["raw"])[:n], np.asarray(first["label"])[:n]
        names = None
    logits, maps = result["logits"], result["class_maps"]
    run.check_class_maps(maps.shape[-1])
    what = "class maps over the images" if overlay else "class maps of the last mlpconv layer"
    legend = "red: predicted" if labels is None else "green: true, red: predicted"
    fig, drawn = class_maps_figure(
        raw, logits, maps, run.class_names, labels=labels, names=names, overlay=overlay,
        title=f"{run.config.model.arch} ({run.config.model.head}), step {run.step}: {what} ({legend})")
    if out is not None:
        save_png(fig, out)
    width, height = (round(v) for v in fig.get_size_inches() * DPI)
    return {"out": out, "step": run.step, "checkpoint": run.checkpoint, "size": (width, height), "images": drawn,
            "figure": fig}


# ---------------------------------------------------------------------------------------------------- curves


def read_metrics(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} from `workdir`/metrics.jsonl (lines cut short by a crash are skipped)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise ConfigError(f"{path} does not exist: --workdir={workdir} holds no training log (metrics.jsonl is "
                          "written by `python -m nin_jax.main` at every log and eval step).")
    series: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                series.setdefault(key, []).append((step, float(value)))
    return {k: sorted(v) for k, v in series.items()}


def _run_labels(workdirs: Sequence[str]) -> list[str]:
    """The shortest path suffixes that tell the runs apart (`gap`, `fc`; `a/gap`, `b/gap`)."""
    parts = [str(w).rstrip("/").split("/") for w in workdirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(w) for w in workdirs]


def curves_figure(workdirs: Sequence[str], labels: Sequence[str] | None = None) -> tuple[Figure, list[dict]]:
    """Train (solid) and eval (dashed, dots) loss and top-1 against step, one colour per workdir."""
    if not workdirs:
        raise ConfigError("curves: pass at least one --workdir.")
    labels = list(labels) if labels is not None else _run_labels(workdirs)
    fig = Figure(figsize=(10, 3.8), dpi=DPI)
    axes = fig.subplots(1, len(CURVE_PANELS), squeeze=False)[0]
    colours = [f"C{i % 10}" for i in range(len(workdirs))]
    runs = []
    for workdir, label, colour in zip(workdirs, labels, colours):
        series = read_metrics(workdir)
        keys = [k for _, ks in CURVE_PANELS for k in ks if series.get(k)]
        if not keys:
            raise ConfigError(f"{workdir}/metrics.jsonl has none of {[k for _, ks in CURVE_PANELS for k in ks]}.")
        for ax, (_, panel_keys) in zip(axes, CURVE_PANELS):
            for key in panel_keys:
                if series.get(key):
                    steps, values = zip(*series[key])
                    ev = key.startswith("eval/")
                    ax.plot(steps, values, color=colour, linestyle="--" if ev else "-", marker="o" if ev else None,
                            markersize=3, linewidth=1.2, label=f"{label} {key.split('/')[0]}")
        runs.append({"workdir": str(workdir), "label": label, "points": {k: len(series[k]) for k in keys},
                     "final": {k: series[k][-1][1] for k in keys}})
    for ax, (name, _) in zip(axes, CURVE_PANELS):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("solid: train, dashed: eval", fontsize=9)
    fig.tight_layout()
    return fig, runs


def curves(workdirs: Sequence[str], out: str | None) -> dict[str, Any]:
    """Draws `curves_figure` of `workdirs` to the PNG `out`; returns {"out", "runs", "size", "figure"}."""
    if out is not None:
        restore.check_output_path(out)
    fig, runs = curves_figure(workdirs)
    if out is not None:
        save_png(fig, out)
    width, height = (round(v) for v in fig.get_size_inches() * DPI)
    return {"out": out, "runs": runs, "size": (width, height), "figure": fig}


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
    fig = Figure(figsize=(4.5 * len(results), 3.6), dpi=DPI)
    axes = fig.subplots(1, len(results), squeeze=False)
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
    save_png(fig, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cm = sub.add_parser("class_maps", help="class confidence maps of eval images or given images (paper Figure 4)")
    cm.add_argument("--workdir", required=True)
    cm.add_argument("--out", required=True, help="PNG file")
    cm.add_argument("--images", nargs="+", default=None, metavar="IMAGE",
                    help="image files to draw (default: the first --num_images of the eval split)")
    cm.add_argument("--overlay", action="store_true", help="each map upsampled over its image")
    cm.add_argument("--num_images", type=int, default=6)
    cm.add_argument("--split", default=None, help="default: the run's config.eval_split")
    cm.add_argument("--checkpoint", default="latest", help=restore.CHECKPOINT_CHOICES)
    cm.add_argument("--data_dir", default=None, help="replaces the saved config.run.data_dir")
    cu = sub.add_parser("curves", help="train/eval loss and top-1 against step, one line per run")
    cu.add_argument("--workdir", action="append", required=True, help="a training workdir; repeat for several")
    cu.add_argument("--out", required=True, help="PNG file")
    sw = sub.add_parser("sweep", help="table and bar chart of a sweep's points")
    sw.add_argument("--root", required=True, help="the sweep root (or one sweep's directory under it)")
    sw.add_argument("--out", default=None, help="markdown file for the table (it is printed as well)")
    sw.add_argument("--plot", default=None, help="PNG file for the bar chart")
    args = parser.parse_args(argv)
    try:
        if args.command == "class_maps":
            hostenv.prepare(restore.load_saved_config(args.workdir))  # before jax's backends start, as in training
            drawn = class_maps(args.workdir, args.out, num_images=args.num_images, split=args.split,
                               checkpoint=args.checkpoint, data_dir=args.data_dir, images=args.images,
                               overlay=args.overlay)
            drawn.pop("figure")
            print(json.dumps(drawn))
        elif args.command == "curves":
            drawn = curves(args.workdir, args.out)
            drawn.pop("figure")
            print(json.dumps(drawn))
        else:
            for flag, value in (("--out", args.out), ("--plot", args.plot)):
                if value:
                    restore.check_output_path(value, flag)
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
