"""gs:// paths that cannot be reached are one line naming the path and what to check (network, credentials).

The storage client's failure is simulated here (its real form, offline, is in test_tool_faults.py and
test_runtime_workdir_faults.py): every message names the path as the command line gave it.
"""

import pytest
from etils import epath

from nin_jax.config import ConfigError
from nin_jax.runtime import remote
from nin_jax.tools import restore, sweeps

HINT = ("check the network and the Google Cloud credentials (a VM's service account; elsewhere `gcloud auth "
        "application-default login`, or GOOGLE_APPLICATION_CREDENTIALS naming a key file).")


@pytest.fixture
def offline(monkeypatch):
    """Every existence check of a path fails as TensorFlow's GCS client fails without a network."""
    checked = []

    def exists(path):
        checked.append(str(path))
        raise RuntimeError("Error executing an HTTP request: libcurl code 6 meaning 'Could not resolve hostname'\n"
                           f"\t when reading metadata of {path}")

    monkeypatch.setattr(type(epath.Path("gs://bucket/x")), "exists", exists)
    return checked


def test_an_unreachable_remote_path_is_one_line_naming_it(offline):
    with pytest.raises(ConfigError) as error:
        remote.check_access("gs://bucket/run", "--workdir")
    assert str(error.value) == ("--workdir=gs://bucket/run cannot be reached (RuntimeError: Error executing an HTTP "
                                "request: libcurl code 6 meaning 'Could not resolve hostname'); " + HINT)
    with pytest.raises(ConfigError, match=r"^image gs://bucket/a\.png cannot be reached \("):
        remote.check_access("gs://bucket/a.png", "image")
    with pytest.raises(ConfigError, match=r"^config\.run\.data_dir=gs://bucket/tfds cannot be reached \("):
        remote.check_access("gs://bucket/tfds", "config.run.data_dir")


def test_local_paths_and_none_are_not_probed(offline, tmp_path):
    remote.check_access(str(tmp_path / "missing"), "--workdir")
    remote.check_access(None, "config.run.data_dir")
    assert offline == []


def test_the_tools_probe_their_remote_paths_first(offline, tmp_path):
    with pytest.raises(ConfigError, match=r"^--workdir=gs://bucket/run cannot be reached"):
        restore.load_saved_config("gs://bucket/run")
    with pytest.raises(ConfigError, match=r"^--out=gs://bucket/maps\.png cannot be reached"):
        restore.check_output_path("gs://bucket/maps.png")
    with pytest.raises(ConfigError, match=r"^image gs://bucket/a\.png cannot be reached"):
        restore.check_image_file("gs://bucket/a.png")
    digits = str(epath.Path(__file__).parent.parent / "configs" / "digits.py")
    with pytest.raises(ConfigError, match=r"^--root=gs://bucket/sweeps cannot be reached"):
        sweeps.run_sweep("bn", "gs://bucket/sweeps", digits, dry_run=True, log=lambda line: None)
