"""How every process of a deployment exposes Prometheus metrics, and how Prometheus finds them.

**The choice.** Each process (the driver, the learner actor, every consumer actor, the serving actor)
exposes the metrics of its own ``prometheus_client`` registry over HTTP, and registers the address in a
Prometheus *file-based service discovery* file (``file_sd``) under ``TelemetrySettings.targets_dir``:
one small JSON file per process, ``<component>-<pid>.json``. Prometheus re-reads that directory by
itself, so an actor restarted on a new port (after a crash) is scraped again without a reload.

Why not Ray's built-in metrics (``ray.util.metrics`` through each node's metrics agent): that path needs
the dashboard agent (the fragile part of a Ray start here, see ``sitn.ray_cluster``), renames every
metric with a ``ray_`` prefix and Ray's own labels, and ties our metrics to Ray: the same classes run
without Ray in tests and benchmarks and must export the same names there. A plain exporter per
process is the Prometheus convention and costs one thread.

Addresses: exporters bind ``host`` (127.0.0.1 by default: nothing is exposed beyond this machine unless
configured). With ``host = 0.0.0.0`` (containers, multi-node Ray) the registered address is
``advertise_host`` or, when that is unset, the node's IP as Ray sees it.

This module lives in ``stream/``, the bottom layer, because the processes of every layer use it (the
consumer actors, the learner actor, the serving actor and the driver's dashboard); the metrics themselves are
defined in each package (``stream.telemetry``, ``learner.online.telemetry``, ``serving.metrics``).

Metric names, units and labels are documented in one place: ``docs/metrics.md``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import orjson
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

TARGETS_JOB = "sitn"


class TelemetrySettings(BaseSettings):
    """Where metrics are exposed. Environment prefix ``SITN_METRICS_``."""

    model_config = SettingsConfigDict(env_prefix="SITN_METRICS_", frozen=True, extra="forbid")

    enabled: bool = Field(default=True, description="expose Prometheus metrics from every process")
    host: str = Field(default="127.0.0.1", description="address the metrics exporters bind")
    advertise_host: str | None = Field(default=None, description="address written to the targets files (default: host, "
                                                         "or the node IP when host is 0.0.0.0)")
    actor_port: int = Field(default=0, ge=0, le=65535, description="port of the actor exporters; 0 = any free port")
    targets_dir: Path | None = Field(default=None, description="file_sd directory Prometheus watches "
                                                       "(default: <run dir>/metrics/targets)")
    dashboard_host: str = Field(default="127.0.0.1", description="address of the driver's /metrics and /dashboard")
    dashboard_port: int = Field(default=9400, ge=0, le=65535, description="port of the driver's /metrics and /dashboard")
    prometheus_url: str | None = Field(default=None, description="a Prometheus that scrapes this run "
                                       "(http://host:9090): the dashboard draws from its query_range API instead "
                                       "of the pipeline's status snapshots")

    @field_validator("prometheus_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1].strip("/")) == 0:
            raise ValueError(f"prometheus_url must be http(s)://host[:port][/path], got {value!r}")
        return value.rstrip("/")


class Exporter:
    """A running metrics endpoint of this process, registered for discovery until ``close()``."""

    def __init__(self, url: str, target_file: Path | None, server: Any = None) -> None:
        self.url = url
        self.target_file = target_file
        self._server = server

    def unregister(self) -> None:
        """Stop being discovered (the endpoint keeps serving until the process ends)."""
        if self.target_file is not None:
            self.target_file.unlink(missing_ok=True)
            self.target_file = None

    def close(self) -> None:
        self.unregister()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _advertised(settings: TelemetrySettings, bound_host: str) -> str:
    if settings.advertise_host:
        return settings.advertise_host
    if bound_host not in ("0.0.0.0", "::", ""):
        return bound_host
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:  # not in a Ray process: the machine's name resolves for peers on its network
        return socket.gethostbyname(socket.gethostname())


def write_target(targets_dir: Path, component: str, address: str, labels: dict[str, str] | None = None) -> Path:
    """Register ``address`` (host:port) for scraping: an atomic write of ``<component>-<pid>.json``.

    The file is ``<component>-<node>-<pid>.json`` (``node``: this machine's host name), so a targets
    directory shared by several nodes keeps one file per process. Files of this node whose process no
    longer exists are removed at the same time (an actor killed with SIGKILL cannot remove its own);
    other nodes' files are left to their own processes.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> path = write_target(d, "learner", "127.0.0.1:9401")
    >>> orjson.loads(path.read_bytes())[0]["labels"]["component"]
    'learner'
    """
    targets_dir.mkdir(parents=True, exist_ok=True)
    prune_targets(targets_dir)
    path = targets_dir / f"{component}-{_node()}-{os.getpid()}.json"
    entry = {"targets": [address], "labels": {"job": TARGETS_JOB, "component": component, **(labels or {})}}
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps([entry], option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)
    return path


def _node() -> str:
    """This machine's name as used in targets file names (no dashes: the pid follows the last one)."""
    return socket.gethostname().replace("-", "_") or "node"


def prune_targets(targets_dir: Path) -> list[Path]:
    """Remove this node's targets files (``<component>-<node>-<pid>.json``) whose process is gone."""
    removed = []
    node = _node()
    for path in targets_dir.glob("*.json"):
        rest, _, pid = path.stem.rpartition("-")
        if rest.rpartition("-")[2] == node and pid.isdigit() and not _pid_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_lock = threading.Lock()
_exporter: Exporter | None = None


def start_exporter(settings: TelemetrySettings | None, component: str, targets_dir: Path | None) -> Exporter | None:
    """Serve this process's default registry on ``settings.host:actor_port`` and register it.

    One exporter per process: a second call (e.g. a restarted actor reusing a worker process) returns
    the running one, registered again under ``component``.
    """
    global _exporter
    if settings is None or not settings.enabled:
        return None
    from prometheus_client import start_http_server

    with _lock:
        if _exporter is None:
            server, _thread = start_http_server(settings.actor_port, addr=settings.host)
            port = int(server.server_port)
            _exporter = Exporter(f"http://{_advertised(settings, settings.host)}:{port}/metrics", None, server)
        address = _exporter.url.removeprefix("http://").removesuffix("/metrics")
        directory = settings.targets_dir or targets_dir
        if directory is not None:
            _exporter.target_file = write_target(Path(directory), component, address)
        log.info("metrics exporter component=%s url=%s", component, _exporter.url)
        return _exporter


def register_existing(settings: TelemetrySettings | None, component: str, url: str,
                      targets_dir: Path | None) -> Path | None:
    """Register an endpoint this process already serves (e.g. the serving API's own ``/metrics``)."""
    if settings is None or not settings.enabled:
        return None
    directory = settings.targets_dir or targets_dir
    if directory is None:
        return None
    address = url.removeprefix("http://").split("/", 1)[0]
    return write_target(Path(directory), component, address)
