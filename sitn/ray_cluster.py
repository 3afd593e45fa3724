"""Starting or joining the Ray cluster the pipeline runs on.

A local cluster has no dashboard, reports no usage stats and keeps its files in a temp dir of its own;
``address`` joins an existing cluster instead. It is asked for 127.0.0.1, but Ray 2.60 resolves a
loopback node address to the machine's routable one (``services.resolve_ip_for_localhost``) and its
gRPC servers listen on all interfaces: confining Ray to loopback needs a firewall or network namespace
(an open item of the security issue). The HTTP API itself binds to 127.0.0.1 by default.

On a busy 2-core machine a local start can fail: the raylet gives the dashboard agent a hard-coded 15 s
to write its port file and aborts otherwise (ray-project/ray#65983), surfacing only as "The current node
timed out during startup". ``init_ray`` retries that start a few times with a fresh temp dir.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

START_ATTEMPTS = 3


def init_ray(address: str | None = None, temp_dir: Path | None = None, num_cpus: int | None = None,
             object_store_bytes: int = 512 * 1024 * 1024) -> dict[str, Any]:
    """``ray.init`` for the pipeline; returns the address info."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # before ray is imported: the process is ours (entry point)
    import ray

    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if address:
        context: Any = ray.init(address=address, runtime_env={"env_vars": env})
        log.info("ray joined address=%s", address)
        return dict(context.address_info)
    for attempt in range(1, START_ATTEMPTS + 1):
        temp = temp_dir if temp_dir is not None and attempt == 1 else Path(
            tempfile.mkdtemp(prefix="sitn-ray-", dir="/tmp"))
        try:
            context = ray.init(
                address="local",
                include_dashboard=False,
                num_cpus=num_cpus or os.cpu_count() or 2,
                object_store_memory=object_store_bytes,
                _node_ip_address="127.0.0.1",
                _temp_dir=str(temp),
                runtime_env={"env_vars": env},
            )
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == START_ATTEMPTS:
                raise
            log.warning("ray local start timed out attempt=%d of=%d temp_dir=%s; retrying", attempt,
                        START_ATTEMPTS, temp)
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
            continue
        log.info("ray started address=%s temp_dir=%s", context.address_info.get("address"), temp)
        return dict(context.address_info)
    raise AssertionError("unreachable")
