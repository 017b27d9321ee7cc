"""Class-map pictures of a trained run, and the sweep table/plot (from a synthetic sweep root)."""

import json

import numpy as np
import pytest
from PIL import Image

import launch_helpers
from nin_jax.config import ConfigError
from nin_jax.tools import analysis


def test_class_maps_png(tmp_path):
    workdir, _ = launch_helpers.trained_workdir()
    out = tmp_path / "maps.png"
    drawn = analysis.class_maps(workdir, str(out), num_images=3)
    # 3 rows; the image + 10 class maps per row at 1.1 in and 100 dpi, plus a 0.4 in title band.
    assert drawn["size"] == (1210, 370)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1210, 370)
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10  # something was drawn
    assert len(drawn["images"]) == 3
    for row in drawn["images"]:
        assert row["classes"] == [str(d) for d in range(10)]
        assert row["true"] in row["classes"] and row["pred"] in row["classes"]
    with pytest.raises(ValueError, match="--num_images=0 must be >= 1"):
        analysis.class_maps(workdir, str(out), num_images=0)


def _write_point(root, sweep, point, top1, steps=100, params=1234):
    d = root / sweep / point
    d.mkdir(parents=True)
    config = {"dataset": "digits", "train_split": "train", "eval_split": "test", "batch_size": 128,
              "model": {"arch": "nin_digits", "width": 0.5}}
    (d / "results.json").write_text(json.dumps({
        "eval/top1": top1, "eval/top5": 0.99, "eval/num_examples": 297, "num_params": params, "step": steps,
        "wall_seconds": 90.0, "config": config}))


def test_sweep_table_and_plot(tmp_path):
    _write_point(tmp_path, "gap_vs_fc", "fc", 0.9)
    _write_point(tmp_path, "gap_vs_fc", "gap", 0.95)
    (tmp_path / "gap_vs_fc" / "fc_dropout" / "checkpoints" / "40").mkdir(parents=True)
    _write_point(tmp_path, "bn", "bn", 0.5)
    plot = tmp_path / "bars.png"
    assert analysis.main(["sweep", f"--root={tmp_path}", f"--out={tmp_path / 'table.md'}", f"--plot={plot}"]) == 0
    table = (tmp_path / "table.md").read_text()
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Method")}
    # Method, point, error %, paper error %, top-1, top-5, params, steps, wall min, status
    assert rows["fc"] == ["mlpconv + Fully Connected", "fc", "10.00", "11.59", "0.9000", "0.9900", "1,234", "100",
                          "1.5", "finished"]
    assert rows["gap"][2:4] == ["5.00", "10.41"]
    assert rows["fc_dropout"][2:4] == ["–", "10.88"] and rows["fc_dropout"][-1] == "unfinished (checkpoint 40)"
    assert rows["bn"][2:4] == ["50.00", "–"] and rows["no_bn"][-1] == "not run"
    assert list(rows) == ["no_bn", "bn", "fc", "fc_dropout", "gap"]  # sweeps by name, points in the sweep's order
    assert "dataset `digits`" in table and "Table 5" in table
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size == (900, 360)  # one 4.5 x 3.6 in panel per sweep at 100 dpi
    # One sweep's directory works as the root too.
    assert len(analysis.collect_sweeps(str(tmp_path / "gap_vs_fc"))) == 1


def test_sweep_root_errors(tmp_path, capsys):
    assert analysis.main(["sweep", f"--root={tmp_path / 'missing'}"]) == 1
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "gap_vs_fc").mkdir()
    with pytest.raises(ConfigError, match="no sweep points under"):
        analysis.collect_sweeps(str(tmp_path))
