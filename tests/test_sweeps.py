"""Sweep definitions, validation, and a real 2-point digits sweep: run, skip on rerun, table and plot."""

import json
import os
import pathlib

import pytest
from PIL import Image

import launch_helpers
from configs import default
from nin_jax.config import ConfigError
from nin_jax import architectures
from nin_jax.tools import analysis, sweeps

DIGITS = launch_helpers.DIGITS
sweep_cli = launch_helpers.sweep_cli()


def test_every_point_overrides_existing_fields_and_builds():
    config = default.get_config()
    for s in sweeps.SWEEPS.values():
        for p in s.points:
            sweeps.check_keys(config, sweeps.point_overrides(s, p, {}), f"{s.name}/{p.name}")
    gap_vs_fc = sweeps.get_sweep("gap_vs_fc")
    assert [(p.name, p.paper_error) for p in gap_vs_fc.points] == [("fc", 11.59), ("fc_dropout", 10.88), ("gap", 10.41)]
    assert gap_vs_fc.base == {"augment.translate": 0, "augment.flip": False}
    assert [p.overrides["model.mlp_layers"] for p in sweeps.get_sweep("mlpconv_vs_conv").points] == [0, 1, 2]
    assert [p.overrides["model.batch_norm"] for p in sweeps.get_sweep("bn").points] == [False, True]


@pytest.mark.parametrize("input_shape", [(8, 8, 1), (32, 32, 3)])
def test_depth_points_fit_8x8_and_32x32(input_shape):
    depths = []
    for p in sweeps.get_sweep("depth").points:
        cfg = default.get_config().model
        cfg.blocks = p.overrides["model.blocks"]
        blocks = architectures.resolve_blocks(cfg, 10)
        rows = architectures.layer_table(blocks, input_shape, num_classes=10)
        assert all(min(r.out_shape) >= 1 for r in rows), (p.name, rows)
        assert rows[-2].out_shape[-1] == 10  # class maps feed the global average
        depths.append(len(blocks))
    assert depths == [1, 2, 3, 4]


def test_bad_sweep_input(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown sweep 'nope'; choose one of \['bn', 'depth', 'gap_vs_fc'"):
        sweeps.run_sweep("nope", str(tmp_path), DIGITS)
    assert sweep_cli.main(["--sweep=nope", f"--root={tmp_path}", f"--config={DIGITS}"]) == 2
    assert "choose one of ['bn', 'depth', 'gap_vs_fc', 'mlpconv_vs_conv']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="would override what sweep 'gap_vs_fc' varies"):
        sweeps.run_sweep("gap_vs_fc", str(tmp_path), DIGITS, {"model.head": "gap"}, dry_run=True)
    with pytest.raises(ValueError, match="config has no field 'model.widht'"):
        sweeps.run_sweep("bn", str(tmp_path), DIGITS, {"model.widht": "0.5"}, dry_run=True)
    with pytest.raises(ValueError, match="has no point 'gapp'"):
        sweeps.run_sweep("gap_vs_fc", str(tmp_path), DIGITS, points=["gapp"], dry_run=True)
    with pytest.raises(ConfigError, match="--config=nowhere.py does not exist"):
        sweeps.run_sweep("bn", str(tmp_path), "nowhere.py")
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        sweeps.parse_overrides(["model.width"])
    assert not list(tmp_path.iterdir())  # nothing was started


@pytest.fixture(scope="module")
def digits_sweep():
    root, argv = launch_helpers.tiny_sweep()
    return pathlib.Path(root), argv


@pytest.mark.slow
def test_sweep_runs_each_point_in_its_workdir(digits_sweep):
    root, _ = digits_sweep
    for point, head in [("fc", "fc"), ("gap", "gap")]:
        results = json.loads((root / "gap_vs_fc" / point / "results.json").read_text())
        c = results["config"]
        assert (c["model"]["head"], c["model"]["width"], c["augment"]["translate"], c["augment"]["flip"]) == \
            (head, 0.25, 0, False)
        assert results["step"] == 12 and results["num_devices"] == 8 and 0 <= results["eval/top1"] <= 1
        assert (root / "gap_vs_fc" / point / "checkpoints" / "12").is_dir()
    assert sorted(p.name for p in (root / "gap_vs_fc").iterdir()) == ["fc", "gap"]


@pytest.mark.slow
def test_rerun_skips_finished_points(digits_sweep):
    root, argv = digits_sweep
    calls, log = [], []
    code = sweeps.run_sweep("gap_vs_fc", str(root), DIGITS, sweeps.parse_overrides(["model.width=0.25"]),
                            ["fc", "gap"], runner=calls.append, log=log.append)
    assert code == 0 and calls == []
    assert len(log) == 2 and all("skipped" in line for line in log)
    # An unfinished point is the one that runs (and resumes from its checkpoints, done by nin_jax.main).
    os.rename(root / "gap_vs_fc" / "gap" / "results.json", root / "gap_vs_fc" / "gap" / "results.moved")
    try:
        sweeps.run_sweep("gap_vs_fc", str(root), DIGITS, None, ["fc", "gap"], runner=lambda c: calls.append(c) or 0,
                         log=log.append)
    finally:
        os.rename(root / "gap_vs_fc" / "gap" / "results.moved", root / "gap_vs_fc" / "gap" / "results.json")
    assert len(calls) == 1 and f"--workdir={root}/gap_vs_fc/gap" in calls[0]


@pytest.mark.slow
def test_sweep_table_and_plot_of_the_real_sweep(digits_sweep, tmp_path):
    root, _ = digits_sweep
    table, plot = tmp_path / "table.md", tmp_path / "bars.png"
    assert analysis.main(["sweep", f"--root={root}", f"--out={table}", f"--plot={plot}"]) == 0
    text = table.read_text()
    for point in ("fc", "gap"):
        top1 = json.loads((root / "gap_vs_fc" / point / "results.json").read_text())["eval/top1"]
        assert f"| {point} | {100 * (1 - top1):.2f} |" in text
    assert "| 11.59 |" in text and "| 10.41 |" in text and "| fc_dropout | – | 10.88 |" in text
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size == (450, 360)
