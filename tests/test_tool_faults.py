"""The tools on a damaged or hand-edited run, and on arguments they cannot use: a right result, or one line.

evaluate, predict, `analysis class_maps` and export restore through the training's own recovery: a newest
checkpoint whose bytes changed is passed over for the previous step with a one-line warning; a checkpoint that
reads but holds non-finite parameters, or a run whose outputs would be non-finite, is refused in one line
naming it. Arguments the tools cannot use (a directory as an image, a batch count of 0, an unwritable output,
a `path:arg` config, an unreachable gs:// path) are one line before any work.

The run is test_predict.py's image folder run (checkpoints 8 and 16, trained once per test process); every
test that damages it works on a copy.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import launch_helpers
import test_predict
from nin_jax import checkpointing, mesh as mesh_lib, models, train
from nin_jax.config import ConfigError
from nin_jax.tools import analysis, evaluate, export, input_benchmark, predict, restore

REPO = test_predict.REPO
# Every HTTP request of the storage client goes to a closed local port and is not retried, and no cloud
# metadata server is asked for credentials: a gs:// path then fails at once, with or without a network.
UNREACHABLE_GCS = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": "",
                   "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "",
                   "GCS_RETRY_CONFIG_MAX_RETRIES": "0", "NO_GCE_CHECK": "true"}


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    """CLI mains called in-process must not re-execute the test process (nin_jax.cpu.hostenv)."""
    monkeypatch.setenv("NIN_JAX_NO_REEXEC", "1")


@pytest.fixture(scope="module")
def trained():
    return test_predict.folder_run()


def _copy(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained["workdir"], copy)
    return copy


def _flip_bytes(directory) -> None:
    """Inverts 64 bytes in the middle of the largest array data file (OCDBT's `d/`), keeping every size and
    name (as tests/test_reliability.py damages a training's checkpoint)."""
    data = max((p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
    data.write_bytes(bytes(raw))


def _lines(text: str) -> list[str]:
    """Output lines, without the log records of the libraries (absl's format, `I1203 12:00:00.000 ...`) and
    the start-up logging of the C++ ones (TensorFlow, XLA), which nin_jax does not control."""
    noise = ("WARNING: All log messages", "WARNING:absl:Type")
    return [line for line in text.splitlines()
            if line.strip() and not line.startswith(noise)
            and not (line[:1] in "IWE" and line[1:5].isdigit() and line[5:6] == " ")]


def _run_tools(workdir, images, out_dir, capsys) -> dict[str, tuple[int, list[str], list[str]]]:
    """{tool: (exit status, stdout lines, stderr lines)} of each tool's command line, in this process."""
    calls = {
        "evaluate": lambda: evaluate.main([f"--workdir={workdir}"]),
        "predict": lambda: predict.main([f"--workdir={workdir}", "--json", "--top=3", *images]),
        "class_maps": lambda: analysis.main(["class_maps", f"--workdir={workdir}", f"--out={out_dir / 'maps.png'}"]),
        "export": lambda: export.main([f"--workdir={workdir}", f"--out={out_dir / 'export'}", "--platforms=cpu"]),
    }
    results = {}
    capsys.readouterr()
    for tool, call in calls.items():
        code = call()
        captured = capsys.readouterr()
        results[tool] = (code, _lines(captured.out), _lines(captured.err))
    return results


def test_flipped_bytes_in_the_newest_checkpoint_make_every_tool_use_the_previous_step(trained, tmp_path, capsys):
    """Step 16's array bytes changed (sizes and names kept): each tool warns in one line naming it and gives
    exactly what step 8 of the intact run gives."""
    copy = _copy(trained, tmp_path)
    _flip_bytes(copy / "checkpoints" / "16" / "state")
    results = _run_tools(copy, trained["images"], tmp_path, capsys)
    for tool, (code, out, err) in results.items():
        assert code == 0, (tool, err)
        assert len(err) == 1, (tool, err)
        assert err[0].startswith(f"warning: checkpoint {copy}/checkpoints/16 is unreadable ("), (tool, err)
        assert err[0].endswith("using step 8, the newest readable one."), (tool, err)

    intact = evaluate.evaluate_checkpoint(trained["workdir"], checkpoint="8")
    got = json.loads(results["evaluate"][1][0])
    assert (got["step"], got["checkpoint"]) == (8, f"{copy}/checkpoints/8")
    assert (got["eval/top1"], got["eval/loss"]) == (intact["eval/top1"], intact["eval/loss"])

    step8 = restore.load_run(trained["workdir"], checkpoint="8")
    probs = step8.predict(trained["images"])
    rows = [json.loads(line) for line in results["predict"][1]]
    assert [row["step"] for row in rows] == [8, 8, 8]
    for row, p in zip(rows, probs):
        for top in row["top"]:
            assert top["probability"] == pytest.approx(float(p[top["index"]]), rel=1e-6, abs=1e-7)

    assert json.loads(results["class_maps"][1][0])["step"] == 8
    assert json.loads(results["export"][1][0])["step"] == 8
    images = step8.load_images(trained["images"])
    exported = jax.export.deserialize(bytearray((tmp_path / "export" / export.ARTIFACT).read_bytes()))
    np.testing.assert_allclose(np.asarray(exported.call(images)["logits"]), step8.outputs(images)["logits"],
                               rtol=0, atol=1e-5)

    assert evaluate.main([f"--workdir={copy}", "--checkpoint=16"]) == 1  # asked for by number: refused
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].endswith("the newest readable step is 8: pass --checkpoint=8."), err


def _write_nonfinite_step(workdir, step: int) -> None:
    """Checkpoint `step` written as training writes one (its arrays and a matching digest), from step 16 with
    one parameter array set to NaN: what a hand-made or foreign checkpoint can hold."""
    config = restore.load_saved_config(str(workdir))
    mesh = mesh_lib.create_mesh(jax.local_devices())
    model = models.create_model(config.model, len(test_predict.CLASSES))
    target = train.abstract_train_state(config, model, (8, 8, 3), optax.constant_schedule(0.0), mesh)
    mngr = checkpointing.create_manager(workdir / "checkpoints", keep=100)
    state, meta = checkpointing.restore(mngr, 16, target)
    leaves, tree = jax.tree.flatten(state.params)
    state = state.replace(params=jax.tree.unflatten(tree, [leaves[0] * jnp.nan, *leaves[1:]]))
    checkpointing.save(mngr, step, state, {**meta, "step": step})
    mngr.wait_until_finished()
    mngr.close()


def test_a_checkpoint_of_nonfinite_parameters_is_refused_by_every_tool_naming_it(trained, tmp_path, capsys):
    copy = _copy(trained, tmp_path)
    _write_nonfinite_step(copy, 24)
    results = _run_tools(copy, trained["images"], tmp_path, capsys)
    for tool, (code, out, err) in results.items():
        assert (code, out) == (1, []), (tool, out, err)
        assert len(err) == 1, (tool, err)
        assert err[0].startswith(f"error: checkpoint {copy}/checkpoints/24 holds NaN or infinite model variables ("
                                 "params/"), (tool, err)
        assert err[0].endswith("pass another saved step, e.g. --checkpoint=16 (saved: [8, 16])."), (tool, err)
    assert not (tmp_path / "maps.png").exists() and not (tmp_path / "export" / export.ARTIFACT).exists()
    assert restore.load_run(str(copy), checkpoint="16").step == 16  # the other steps stay usable


def test_nonfinite_preprocessing_statistics_are_refused_by_every_tool(trained, tmp_path, capsys):
    """Finite parameters, but the run's fitted statistics edited to hold an infinity: every output would be
    NaN (or, after BatchNorm, finite nonsense), so each tool stops in one line naming the file."""
    copy = _copy(trained, tmp_path)
    path = copy / "preprocessing.npz"
    arrays = dict(np.load(path))
    arrays["stats/whitening"][0, 0] = np.inf
    np.savez(path, **arrays)
    results = _run_tools(copy, trained["images"], tmp_path, capsys)
    for tool, (code, out, err) in results.items():
        assert (code, out) == (1, []), (tool, out, err)
        assert err == [f"error: the fitted preprocessing statistics ['whitening'] of the run in --workdir={copy} "
                       "(preprocessing.npz) hold NaN or infinite values; restore that file from a copy of the run."], \
            (tool, err)


def test_nonfinite_outputs_are_an_error_not_numbers(trained, monkeypatch):
    """Inputs that overflow (here: NaN model inputs), or evaluation metrics that are not finite, although the
    variables are finite."""
    run = restore.load_run(trained["workdir"])
    with pytest.raises(ConfigError, match=r"checkpoints/16 gives NaN or infinite logits for 1 of 2 inputs \(the "
                                          r"first is input #1\): its variables are finite"):
        run.forward(np.stack([np.zeros((8, 8, 3)), np.full((8, 8, 3), np.nan)]))
    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a: {**real(*a), "eval/loss": float("inf")})
    with pytest.raises(ConfigError, match=r"^evaluating .*checkpoints/16 gave eval/loss=inf: its variables are "
                                          "finite"):
        evaluate.evaluate_checkpoint(trained["workdir"])


def test_an_image_argument_that_is_a_directory_is_one_line(trained, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    expected = f"error: image {folder} is a directory; pass image files (e.g. {folder}/*.jpg)."
    assert predict.main([f"--workdir={trained['workdir']}", trained["images"][0], str(folder)]) == 1
    assert _lines(capsys.readouterr().err) == [expected]
    assert analysis.main(["class_maps", f"--workdir={trained['workdir']}", f"--out={tmp_path / 'maps.png'}",
                          "--images", str(folder)]) == 1
    assert _lines(capsys.readouterr().err) == [expected]
    with pytest.raises(ConfigError, match="is a directory"):
        restore.load_run(trained["workdir"]).predict([str(folder)])


def test_input_benchmark_refuses_zero_batches_and_a_zero_mfu(tmp_path):
    config = test_predict.folder_config(test_predict.folder_run()["data_dir"], str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"^--num_batches=0 must be >= 1"):
        input_benchmark.measure_input_throughput(config, 0)
    with pytest.raises(ConfigError, match=r"^--mfu=0 must be in \(0, 1\]"):
        input_benchmark.run(config, 2, workers=0, device_kind="TPU v4", mfu=0)


@pytest.mark.slow
def test_input_benchmark_cli_zero_batches_is_one_line():
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    proc = subprocess.run([sys.executable, "-m", "nin_jax.input_benchmark", "--config=configs/digits.py",
                           "--num_batches=0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert (proc.returncode, _lines(proc.stdout)) == (1, []), proc.stderr[-3000:]
    assert _lines(proc.stderr) == ["error: --num_batches=0 must be >= 1: the rate is images over the time of the "
                                   "timed batches."], proc.stderr[-3000:]


def test_benchmark_checks_its_output_paths_before_benchmarking(tmp_path, capsys, monkeypatch):
    from absl import flags  # pylint: disable=g-import-not-at-top
    from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top

    from nin_jax.tools import benchmark  # pylint: disable=g-import-not-at-top  (defines absl flags)

    monkeypatch.setattr(benchmark, "run", lambda *a, **k: pytest.fail("benchmarked before checking the outputs"))
    (tmp_path / "file").write_text("")
    for flag, path, why in (("--json", tmp_path / "file" / "r.json", "is not writable"),
                            ("--json", tmp_path, "is a directory"),
                            ("--trace_dir", tmp_path / "file", "is a file")):
        with flagsaver.flagsaver():
            flags.FLAGS(["benchmark", f"--config={launch_helpers.DIGITS}", f"{flag}={path}"])
            with pytest.raises(SystemExit) as exited:
                benchmark.main(["benchmark"])
        assert exited.value.code == 1
        err = _lines(capsys.readouterr().err)
        assert len(err) == 1 and err[0].startswith(f"error: {flag}={path} {why}"), err


def test_sweep_config_takes_the_path_arg_form_of_nin_jax_main(tmp_path, capsys):
    sweep_cli = launch_helpers.sweep_cli()
    cifar10 = os.path.join(REPO, "configs", "cifar10.py")
    assert sweep_cli.main(["--sweep=bn", f"--root={tmp_path}", f"--config={cifar10}:modern", "--dry_run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(f"--config={cifar10}:modern --workdir={tmp_path}/bn/" in line for line in out), out
    assert sweep_cli.main(["--sweep=bn", f"--root={tmp_path}", f"--config={cifar10}:bogus", "--dry_run"]) != 0
    # The config file's own one-line refusal of the argument:
    assert _lines(capsys.readouterr().err) == ["error: configs/cifar10.py:bogus is unknown; use 'caffe' (default) or "
                                               "'modern'."]


@pytest.mark.slow
def test_an_unreachable_gs_workdir_is_one_line_naming_it_and_the_credentials():
    env = {**os.environ, **UNREACHABLE_GCS, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "NIN_JAX_NO_REEXEC": "1"}
    workdir = "gs://nin-jax-tests-unreachable/run"
    proc = subprocess.run([sys.executable, "-m", "nin_jax.evaluate", f"--workdir={workdir}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr[-3000:]
    err = _lines(proc.stderr)
    assert len(err) == 1, proc.stderr[-3000:]
    assert err[0].startswith(f"error: --workdir={workdir} cannot be reached (")
    assert err[0].endswith("check the network and the Google Cloud credentials (a VM's service account; elsewhere "
                           "`gcloud auth application-default login`, or GOOGLE_APPLICATION_CREDENTIALS naming a key "
                           "file).")
