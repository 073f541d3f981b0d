"""The settings' sources read before (or without) the settings themselves: the TOML config file, and the log format
of settings that did not load (config.py reads the file again as one of its sources)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pgsynapse.errors import ConfigError

ENV_PREFIX = "PGSYNAPSE_"


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML config file: at its top level, or all of them under a ``[pgsynapse]`` table."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}): TOML files are UTF-8") from None
    except OSError as exc:  # a directory, no permission to read it (a file of root's, read by User=pgsynapse)
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    if "pgsynapse" not in data:
        return data
    table, others = data["pgsynapse"], sorted(k for k in data if k != "pgsynapse")
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: pgsynapse must be a table ([pgsynapse]) of settings, "
                          f"not a {type(table).__name__}")
    if others:
        raise ConfigError(f"config file {path}: settings go at the top level or under [pgsynapse], not both "
                          f"(at the top level: {', '.join(others)})")
    return table


def early_log_format(config_file: str | Path | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The log format of settings that did not load (the error that stopped them is logged in it): the
    environment's PGSYNAPSE_LOG_FORMAT, else the config file's ``log_format`` when the file parses; None if neither."""
    environ = os.environ if environ is None else environ
    if fmt := environ.get(ENV_PREFIX + "LOG_FORMAT"):
        return fmt.lower()
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    try:
        fmt = read_config_file(Path(config_file)).get("log_format") if config_file else None
    except ConfigError:
        return None
    return fmt.lower() if isinstance(fmt, str) else None
