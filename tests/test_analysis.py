"""Class-map pictures of a trained run, and the sweep table/plot (from a synthetic sweep root)."""

import json

import numpy as np
import pytest
from PIL import Image

import launch_helpers
from nin_jax.config import ConfigError
from nin_jax.tools import analysis, restore


@pytest.mark.slow
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


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    """CLI mains called in-process must not re-execute the test process (nin_jax.cpu.hostenv)."""
    monkeypatch.setenv("NIN_JAX_NO_REEXEC", "1")


def test_class_maps_of_given_images_overlaid(tmp_path):
    workdir, _ = launch_helpers.trained_workdir()
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(8, 8), (30, 21)]):  # any size: resized to the model's 8x8 like predict
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(path)
        paths.append(str(path))
    plain, overlay = tmp_path / "maps.png", tmp_path / "overlay.png"
    drawn = analysis.class_maps(workdir, str(plain), images=paths)
    assert analysis.main(["class_maps", f"--workdir={workdir}", "--images", *paths, "--overlay",
                          f"--out={overlay}"]) == 0
    assert drawn["size"] == (1210, 260) and drawn["step"] == 12  # 2 rows of the image + 10 maps
    assert [row["image"] for row in drawn["images"]] == ["digit0.png", "digit1.png"]
    assert all("true" not in row and row["pred"] in row["classes"] for row in drawn["images"])
    with Image.open(plain) as a, Image.open(overlay) as b:
        assert a.size == b.size == (1210, 260)
        a, b = np.asarray(a.convert("RGB"), np.float32), np.asarray(b.convert("RGB"), np.float32)
    assert np.abs(a - b).mean() > 5  # the maps are drawn over the images
    # The maps are the API's: the logits are their spatial means.
    run = restore.load_run(workdir)
    out = run.outputs(paths)
    np.testing.assert_allclose(out["class_maps"].mean(axis=(1, 2)), out["logits"], rtol=1e-5, atol=1e-5)
    assert [run.class_names[i] for i in out["logits"].argmax(-1)] == [row["pred"] for row in drawn["images"]]


def test_upsample_keeps_a_constant_map_and_the_size():
    m = np.full((2, 3), 0.7, np.float32)
    up = analysis.upsample(m, 8, 12)
    assert up.shape == (8, 12) and np.allclose(up, 0.7)


def test_curves_of_several_runs(tmp_path, capsys):
    root, _ = launch_helpers.tiny_sweep()
    runs = [f"{root}/gap_vs_fc/fc", f"{root}/gap_vs_fc/gap"]
    out = tmp_path / "curves.png"
    assert analysis.main(["curves", f"--workdir={runs[0]}", f"--workdir={runs[1]}", f"--out={out}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in printed["runs"]] == ["fc", "gap"] and printed["size"] == [1000, 380]
    for run, summary in zip(runs, printed["runs"]):
        rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
        for key in ("train/loss", "train/top1", "eval/loss", "eval/top1"):
            values = [r[key] for r in rows if key in r]
            assert summary["points"][key] == len(values) and summary["final"][key] == values[-1]
        assert summary["points"]["eval/top1"] == 2  # evaluated at steps 6 and 12
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1000, 380)
    # Same directory names in two roots: labels keep the parent to tell them apart.
    assert analysis._run_labels(["/a/x/gap", "/b/x/gap", "/b/y/fc"]) == ["a/x/gap", "b/x/gap", "b/y/fc"]


def test_curves_errors(tmp_path):
    with pytest.raises(ConfigError, match="metrics.jsonl does not exist"):
        analysis.curves([str(tmp_path)], None)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "img/sec/core": 10.0}\n{"step": 2, "train/lo')
    with pytest.raises(ConfigError, match="has none of"):
        analysis.curves([str(tmp_path)], None)


def test_unwritable_out_is_reported_before_any_work(tmp_path, capsys, monkeypatch):
    workdir, _ = launch_helpers.trained_workdir()
    (tmp_path / "file").write_text("")
    bad = str(tmp_path / "file" / "out.png")
    monkeypatch.setattr(restore, "load_run", lambda *a, **k: pytest.fail("restored before checking --out"))
    monkeypatch.setattr(analysis.evaluate, "restore_for_evaluation",
                        lambda *a, **k: pytest.fail("restored before checking --out"))
    for argv in (["class_maps", f"--workdir={workdir}", f"--out={bad}"],
                 ["class_maps", f"--workdir={workdir}", "--images", str(tmp_path / "file"), f"--out={bad}"],
                 ["curves", f"--workdir={tmp_path / 'no_run'}", f"--out={bad}"],
                 ["sweep", f"--root={tmp_path / 'no_root'}", f"--plot={bad}"]):
        assert analysis.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --{'plot' if 'sweep' in argv else 'out'}={bad} is not "
                                                   "writable"), err
