"""What every stage of the CLI shares: the console (stderr), the effective settings loaded by the root callback,
logging set-up, and waiting for a stop signal."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from prometheus_client import start_http_server
from rich.console import Console

from flywheel.settings import Settings, load_settings
from shadow.config import configure_execution

console = Console(stderr=True)


class _State:
    settings: Settings | None = None


def configure(config: Path | None, verbose: bool, log_format: str) -> None:
    """Logging as asked and the settings of `config` (TOML), for the commands that follow."""
    handler = logging.StreamHandler()
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    _State.settings = load_settings(config)
    configure_execution(_State.settings.execution)  # every model this process runs: providers, torch device


def settings() -> Settings:
    """The effective settings (defaults, TOML file, FLYWHEEL_* environment)."""
    return _State.settings or load_settings()


def wait_for_stop() -> None:
    """Block until SIGINT or SIGTERM."""
    stop_on_signal().wait()


def stop_on_signal() -> threading.Event:
    """An event set by SIGINT or SIGTERM (for services that stop after a final flush)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def start_metrics(port: int) -> None:
    """Serve prometheus_client's registry on `port` (0: none)."""
    if port:
        start_http_server(port)
