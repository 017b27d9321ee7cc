"""`<workdir>/metrics.jsonl`: the run's scalars as JSON lines, a clu `MetricWriter` beside TensorBoard's."""

from __future__ import annotations

import json
from typing import Any, Mapping

from clu.metric_writers import interface
from etils import epath


def read_rows(path: epath.Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (`{"step": s, <name>: value, ...}`), without lines cut short by a crash."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


class JsonlWriter(interface.MetricWriter):
    """One line `{"step": s, <name>: value, ...}` per `write_scalars` call; other kinds of summary are ignored.

    A plain-text copy of the scalars for scripts and tests. Opened at `start_step` of a resumed run, it drops
    the lines logged after that step before the interruption, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: epath.Path, start_step: int):
        self._path = path
        self.rows: dict[int, dict[str, float]] = {}  # the kept lines by step (train and eval lines merged)
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                if row["step"] <= start_step:
                    kept.append(line + "\n")
                    self.rows.setdefault(row.pop("step"), {}).update(row)
            except (ValueError, KeyError, AttributeError, TypeError):  # a line cut short by a crash
                pass
        path.write_text("".join(kept))

    def last_train_row(self) -> dict[str, float]:
        """The train/* scalars of the last logged step (for the results of a run resumed at its end)."""
        for step in sorted(self.rows, reverse=True):
            row = {k: v for k, v in self.rows[step].items() if not k.startswith("eval/")}
            if "train/loss" in row:
                return row
        return {}

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        with self._path.open("a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def write_summaries(self, step, values, metadata=None) -> None:
        del step, values, metadata

    def write_images(self, step, images) -> None:
        del step, images

    def write_videos(self, step, videos) -> None:
        del step, videos

    def write_audios(self, step, audios, *, sample_rate) -> None:
        del step, audios, sample_rate

    def write_texts(self, step, texts) -> None:
        del step, texts

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        del step, arrays, num_buckets

    def write_hparams(self, hparams) -> None:
        del hparams

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
