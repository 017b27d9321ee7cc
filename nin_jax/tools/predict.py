"""Classifies images with a trained run: `python -m nin_jax.predict --workdir=W [--checkpoint=latest] IMAGE...`.

Prints, for each image, its `--top` classes by name with their probabilities; with `--json`, one JSON line
per image instead: {"image", "top": [{"class", "index", "probability"}, ...], "step", "checkpoint"}; with
`--out=FILE`, the same text goes to FILE (checked to be writable before anything else).
Images of any size are resized or center-cropped to the model's input as the run's evaluation does (see
`nin_jax.tools.restore`). Only the workdir is read: config.json, the checkpoint's parameters and BatchNorm
statistics, and the run's fitted preprocessing.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from etils import epath

from nin_jax.config import ConfigError
from nin_jax.cpu import hostenv
from nin_jax.tools import restore


def predict_files(workdir: str, images: Sequence[str], *, checkpoint: str = "latest", top: int = 5,
                  data_dir: str | None = None) -> list[dict[str, Any]]:
    """[{"image", "top": [{"class", "index", "probability"}], "step", "checkpoint"}] for each image path."""
    if top < 1:
        raise ConfigError(f"--top={top} must be >= 1.")
    if not images:
        raise ConfigError("no images given: pass one or more image paths after the flags.")
    for image in images:  # before the (slower) restore
        restore.check_image_file(image)
    run = restore.load_run(workdir, checkpoint, data_dir=data_dir)
    probs = run.predict(list(images))
    k = min(top, run.num_classes)
    rows = []
    for image, p in zip(images, probs):
        order = sorted(range(run.num_classes), key=lambda c: -p[c])[:k]
        rows.append({"image": str(image), "top": [{"class": run.class_names[c], "index": c, "probability": float(p[c])}
                                                  for c in order],
                     "step": run.step, "checkpoint": run.checkpoint})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        lines.append(row["image"])
        lines.extend(f"  {100 * t['probability']:7.3f}%  {t['class']}" for t in row["top"])
    if rows:
        lines.append(f"(step {rows[0]['step']}: {rows[0]['checkpoint']})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training workdir (local or gs://)")
    parser.add_argument("--checkpoint", default="latest", help=restore.CHECKPOINT_CHOICES)
    parser.add_argument("--top", type=int, default=5, help="classes to print per image")
    parser.add_argument("--json", action="store_true", help="one JSON line per image")
    parser.add_argument("--out", default=None, help="write the output to this file instead of stdout")
    parser.add_argument("--data_dir", default=None, help="replaces the saved config.run.data_dir (data moved)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (.jpg, .png, ...; local or gs://)")
    args = parser.parse_args(argv)
    try:
        if args.out:
            restore.check_output_path(args.out)
        hostenv.prepare(restore.load_saved_config(args.workdir))  # before jax's backends start, as in training
        rows = predict_files(args.workdir, args.images, checkpoint=args.checkpoint, top=args.top,
                             data_dir=args.data_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = "\n".join(json.dumps(row) for row in rows) if args.json else format_rows(rows)
    if args.out:
        epath.Path(args.out).write_text(text + "\n")
    else:
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
