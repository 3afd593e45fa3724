"""Starting or joining the Ray cluster the pipeline runs on.

A local cluster binds to 127.0.0.1, has no dashboard, reports no usage stats and keeps its files in a
temp dir of its own; ``address`` joins an existing cluster instead.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, temp_dir: Path | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """``ray.init`` for the pipeline; returns the address info."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # before ray is imported: the process is ours (entry point)
    import ray

    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if address:
        context = ray.init(address=address, runtime_env={"env_vars": env})
    else:
        temp = temp_dir or Path(tempfile.mkdtemp(prefix="sitn-ray-", dir="/tmp"))
        context = ray.init(
            address="local",
            include_dashboard=False,
            num_cpus=num_cpus or os.cpu_count() or 2,
            object_store_memory=512 * 1024 * 1024,
            _node_ip_address="127.0.0.1",
            _temp_dir=str(temp),
            runtime_env={"env_vars": env},
        )
    log.info("ray started address=%s", context.address_info.get("address"))
    return dict(context.address_info)
