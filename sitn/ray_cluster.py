"""Starting or joining the Ray cluster the pipeline runs on.

A local cluster has no dashboard, reports no usage stats and keeps its files in a temp dir of its own;
``address`` joins an existing cluster instead.

Binding (measured with ``ss``/psutil, see docs/security.md): asked for ``_node_ip_address="127.0.0.1"``
alone, Ray 2.60 replaces a loopback node address with the machine's routable one
(``services.resolve_ip_for_localhost``), and the GCS, the raylet and every worker then listen on ``::``
(all interfaces). ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` -- Ray's switch for single-machine clusters,
on by default on Windows and macOS -- makes ``services.get_node_ip_address`` return loopback instead,
and then every server of the cluster listens on 127.0.0.1 only. ``init_ray`` sets it for a local start
(``tests/test_security.py`` checks every listening socket). Ray 2.60 also turns token authentication on
for a new local cluster when ``RAY_AUTH_MODE`` is unset (token in ``~/.ray/auth_token``). It is left to
Ray: setting ``RAY_AUTH_MODE=token`` here, after ``ray`` was imported, leaves this process's cached mode
"disabled" while the GCS it starts demands the token, and the start fails (Ray's own default refreshes
the cache).

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
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": the node address stays 127.0.0.1


def init_ray(address: str | None = None, temp_dir: Path | None = None, num_cpus: int | None = None,
             object_store_bytes: int = 512 * 1024 * 1024) -> dict[str, Any]:
    """``ray.init`` for the pipeline; returns the address info.

    A local cluster listens on 127.0.0.1 only (see the module docstring); ``address`` joins a cluster
    whose binding is the operator's.
    """
    # Environment of this process and so of every Ray process it starts: the process is ours (entry point).
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if not address:
        os.environ[LOOPBACK_ONLY_ENV] = "0"  # read when ray is imported: the GCS, raylet and workers get it
    import ray

    if not address:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # this process may have imported ray before the variable was set

    from serving.threads import single_thread_blas_env

    env = {"RAY_USAGE_STATS_ENABLED": "0", **single_thread_blas_env()}  # every actor: one BLAS thread
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
