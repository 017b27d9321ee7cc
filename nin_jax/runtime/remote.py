"""Paths on object stores (gs://...): a location that cannot be reached is one line, before any work.

Reading a gs:// path needs network access to Cloud Storage and Google Cloud credentials. Without either, the
storage library fails deep inside its first call with a long traceback that never says so; the command-line
paths (training's workdir and data, the tools' workdir, a sweep's root) are therefore probed first.
"""

from __future__ import annotations

from etils import epath

from nin_jax.config import ConfigError

CREDENTIALS_HINT = ("check the network and the Google Cloud credentials (a VM's service account; elsewhere "
                    "`gcloud auth application-default login`, or GOOGLE_APPLICATION_CREDENTIALS naming a key file)")


def is_remote(path: str | epath.Path | None) -> bool:
    return path is not None and "://" in str(path)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def check_access(path: str | epath.Path | None, flag: str) -> None:
    """Raises ConfigError naming `path` if that object-store path cannot be reached (local paths and None
    pass: their errors name themselves). `flag` says where the path came from: a flag or config field
    (`--workdir`, `config.run.data_dir`: named `flag=path`) or a word (`image`: named `image path`)."""
    if not is_remote(path):
        return
    try:
        epath.Path(path).exists()
    except Exception as e:  # noqa: BLE001 — any failure of this one read is the location's: network, credentials
        named = f"{flag}={path}" if flag.startswith("-") or "." in flag else f"{flag} {path}"
        raise ConfigError(f"{named} cannot be reached ({_first_line(e)}); {CREDENTIALS_HINT}.") from e
