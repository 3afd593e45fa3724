"""Resident memory of the live system, per component: the driver and every process below it.

Ray names each worker process ``ray::<ActorClass>[.<method>]``, so an actor's process says which part of
the pipeline it is; Ray's own processes (GCS, raylet, monitors) and idle workers are counted apart, and a
broker started below the driver (``java``) is ``kafka``. ``sitn run`` samples this every status tick and
writes the peaks to ``summary.json``; ``bench/bench_soak.py`` samples it over a soak.
"""

from __future__ import annotations

import psutil

# the pipeline's actor classes, by the process title Ray gives their workers
ACTOR_COMPONENTS = {"ServingCore": "serving", "LearnerWorker": "learner", "ConsumerWorker": "consumers",
                    "_QueueActor": "queue"}
COMPONENTS = ("driver", "serving", "learner", "consumers", "queue", "ray_system", "ray_idle", "kafka")


def component_of(proc: psutil.Process) -> str:
    """The component a process below the driver belongs to (see the module docstring)."""
    cmdline = proc.cmdline()
    title = cmdline[0] if cmdline else proc.name()
    if title.startswith("ray::"):
        cls = title.removeprefix("ray::").split(".")[0].split(" ")[0]
        if cls == "IDLE":
            return "ray_idle"
        return ACTOR_COMPONENTS.get(cls, "ray_system")
    if proc.name() == "java":
        return "kafka"
    return "ray_system"  # gcs_server, raylet, Ray's monitors


def rss_by_component() -> dict[str, float]:
    """Resident MiB per component, now: the driver and every process below it (Ray's and a broker's)."""
    me = psutil.Process()
    out = dict.fromkeys(COMPONENTS, 0.0)
    out["driver"] = me.memory_info().rss / 2**20
    for proc in me.children(recursive=True):
        try:
            out[component_of(proc)] += proc.memory_info().rss / 2**20
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # ended between the listing and the reading
    return out


class PeakMemory:
    """The largest resident MiB seen per component (and in total) over the samples taken with ``sample``.

    >>> peaks = PeakMemory()
    >>> peaks.observe({"driver": 100.0, "learner": 300.0}); peaks.observe({"driver": 90.0, "learner": 350.0})
    >>> peaks.peak_mb, peaks.peak_total_mb
    ({'driver': 100.0, 'learner': 350.0}, 440.0)
    """

    def __init__(self) -> None:
        self.peak_mb: dict[str, float] = {}
        self.peak_total_mb = 0.0
        self.last_mb: dict[str, float] = {}

    def observe(self, mb: dict[str, float]) -> None:
        self.last_mb = dict(mb)
        for component, value in mb.items():
            self.peak_mb[component] = max(self.peak_mb.get(component, 0.0), value)
        self.peak_total_mb = max(self.peak_total_mb, sum(mb.values()))

    def sample(self) -> dict[str, float]:
        """Read every component's resident memory now, keep the peaks, and return the reading."""
        mb = rss_by_component()
        self.observe(mb)
        return mb
