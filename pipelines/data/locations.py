"""Where data lie: the data root, a path given with ``folder:`` or ``npz:``, whether downloads are
allowed, and the one error type for data that cannot be had or read."""
from __future__ import annotations

import os
from pathlib import Path

from cvae.config import ConfigError
from pipelines.config import OWN_DATA_KINDS, DataConfig
from pipelines.errors import UserError

OFFLINE_ENV = "CVAE_OFFLINE"  # set to 1 to never try a download


class DataUnavailableError(UserError):
    """The dataset's files are not on disk and could not be downloaded, or cannot be read."""


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def resolve_root(config: DataConfig) -> Path:
    """The data root; a ``data_dir`` the user names must exist (a typo must not fall back to other data)."""
    if config.data_dir:
        given = Path(config.data_dir).expanduser()
        if given.is_file():
            raise ConfigError(f"data.data_dir={config.data_dir!r} is not valid; it is a file, not a directory")
        if not given.is_dir():
            raise ConfigError(f"data.data_dir={config.data_dir!r} is not valid; no such directory (create it "
                              "to download the data into it)")
    return Path(config.data_dir or os.environ.get("CVAE_DATA_DIR") or "data").expanduser().resolve()


def source_kind(config: DataConfig) -> str:
    """'folder' or 'npz' for one's own data, else the dataset's name."""
    kind, colon, _ = config.dataset.partition(":")
    return kind if colon and kind in OWN_DATA_KINDS else config.dataset


def own_data_path(config: DataConfig) -> Path:
    """The path of ``folder:PATH`` or ``npz:PATH``: as given when absolute; a relative one in the
    working directory, else under the data root (so ``--data-dir`` re-points a re-run)."""
    kind, _, text = config.dataset.partition(":")
    given = Path(text).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given, resolve_root(config) / given]
    wanted = Path.is_dir if kind == "folder" else Path.is_file
    for candidate in candidates:
        if wanted(candidate):
            return candidate.resolve()
    what = "directory" if kind == "folder" else "file"
    for candidate in candidates:
        if candidate.exists():
            raise ConfigError(f"data.dataset={config.dataset!r} is not valid; {candidate} is not a {what}")
    raise ConfigError(f"data.dataset={config.dataset!r} is not valid; no such {what}: "
                      f"{' nor '.join(str(c) for c in candidates)}")
