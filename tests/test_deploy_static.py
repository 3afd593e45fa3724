"""Static checks of the deployment files, without Docker: docker-compose.yml and the Dockerfile against the
application's settings classes and CLI parser, the Prometheus scrape and alert config and the Grafana
dashboard against the metrics the code registers. ``promtool`` (Debian package ``prometheus``) checks the
config, parses every dashboard query and unit-tests every alert when it is on PATH."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.conftest import EVENTS_CSV, REPO, SHARED_DATA, skip_or_fail

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
PROMETHEUS = REPO / "infra" / "prometheus" / "prometheus.yml"
ALERTS = REPO / "infra" / "prometheus" / "alerts.yml"
GRAFANA = REPO / "infra" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "sitn-stream.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
METRICS_DOC = REPO / "docs" / "metrics.md"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "sitn.yml"

SERVICES = {"kafka", "ray-head", "ray-worker", "learner", "serving", "prometheus", "grafana"}
APP_SERVICES = {"ray-head", "ray-worker", "learner", "serving"}  # built from the Dockerfile
ACTOR_NODES = {"ray-head", "ray-worker", "learner"}  # Ray nodes: actors may run (and write targets) there
ALERTS_EXPECTED = {
    "SitnDriftAlarmActive", "SitnPublishGateClosed", "SitnNoTrainingProgress", "SitnConsumerLagHigh",
    "SitnDeadLettersHigh", "SitnFreshnessP99High", "SitnHttp5xxRate", "SitnTargetDown", "SitnServingBaseline",
}
# every module that defines metrics (docs/metrics.md); learner.online.drift is imported separately
METRIC_MODULES = ("stream.telemetry", "learner.online.telemetry", "learner.online.drift", "serving.metrics", "serving.actor")
METRIC_RE = re.compile(r"\bsitn_[a-z0-9_]+\b")
SHELL_OPERATORS = {"&&", "||", ";", "|"}


# -- loading ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), f"{COMPOSE} has no services map"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS.read_text())


@pytest.fixture(scope="module")
def alerts() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict (compose allows a map or a list of NAME=value)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def dockerfile_entrypoint() -> list[str]:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("ENTRYPOINT "):
            return list(json.loads(line.removeprefix("ENTRYPOINT ")))
    raise AssertionError(f"{DOCKERFILE} has no exec-form ENTRYPOINT")


def sitn_invocations(service: dict[str, Any]) -> list[list[str]]:
    """The argument lists of every ``sitn`` the service's container runs (entrypoint + command)."""
    entrypoint = service.get("entrypoint", dockerfile_entrypoint())
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    command = service.get("command", [])
    command = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
    if entrypoint == ["sitn"]:
        return [command]
    if entrypoint[-1:] == ["-c"] and entrypoint[0] in ("/bin/sh", "sh", "/bin/bash", "bash"):
        lexer = shlex.shlex(" ".join(command), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        out, segment = [], []
        for token in [*tokens, ";"]:
            if token in SHELL_OPERATORS:
                if segment and segment[0] == "exec":
                    segment = segment[1:]
                if segment and segment[0] == "sitn":
                    out.append(segment[1:])
                segment = []
            else:
                segment.append(token)
        return out
    return []


def parse_sitn(argv: list[str]) -> argparse.Namespace:
    from sitn.cli import build_parser

    try:
        args, unknown = build_parser().parse_known_args(argv)
    except SystemExit as exc:  # argparse printed the reason to stderr
        raise AssertionError(f"`sitn {shlex.join(argv)}` does not parse with sitn.cli: {exc}") from None
    assert not unknown, f"`sitn {shlex.join(argv)}`: unknown arguments {unknown}"
    return args


def flag_value(argv: list[str], flag: str) -> str | None:
    """Value of ``--flag value`` or ``--flag=value`` in ``argv`` (the last one wins), else None."""
    value = None
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(flag + "="):
            value = token.split("=", 1)[1]
    return value


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of each short-syntax port mapping."""
    out = []
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        assert len(parts) in (2, 3), f"port mapping {entry!r}: write [ip:]host:container"
        ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        out.append((ip, int(parts[-2]), int(parts[-1].split("/")[0])))
    return out


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) of each short-syntax volume."""
    out = {}
    for entry in service.get("volumes", []):
        parts = str(entry).split(":")
        assert len(parts) in (2, 3), f"volume {entry!r}: write source:target[:mode]"
        out[parts[1]] = (parts[0], len(parts) == 3 and "ro" in parts[2].split(","))
    return out


def settings_classes() -> dict[str, type]:
    """env prefix -> settings class, for every class whose module imports."""
    from serving.settings import ServingSettings
    from sitn.settings import RunSettings
    from stream.exporter import TelemetrySettings
    from stream.settings import StreamSettings

    classes: list[type] = [StreamSettings, ServingSettings, RunSettings, TelemetrySettings]
    try:
        from learner.online.drift import DriftSettings

        classes.append(DriftSettings)
    except ImportError:  # learner/online/drift.py not landed: a SITN_DRIFT_* variable then fails to map, as it should
        pass
    return {cls.model_config["env_prefix"]: cls for cls in classes}  # type: ignore[attr-defined]


def settings_field(name: str, classes: dict[str, type]) -> list[tuple[type, str]]:
    """Every (class, field) that reads environment variable ``name``."""
    return [(cls, field) for prefix, cls in classes.items() for field in cls.model_fields  # type: ignore[attr-defined]
            if name.upper() == (prefix + field).upper()]


# -- compose: structure -------------------------------------------------------------------------------


def test_compose_has_the_expected_services(services: dict[str, Any]) -> None:
    assert set(services) == SERVICES


def test_every_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    missing = {name for name, s in services.items()
               if not (s.get("healthcheck", {}).get("test") and s["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"))}
    assert not missing, f"services without a CMD/CMD-SHELL healthcheck: {sorted(missing)}"


def test_depends_on_targets_exist_and_are_waited_for_until_healthy(services: dict[str, Any]) -> None:
    problems = []
    edges = 0
    for name, service in services.items():
        deps = service.get("depends_on", {})
        if isinstance(deps, list):  # short syntax means condition: service_started
            deps = {d: {"condition": "service_started"} for d in deps}
        for target, spec in deps.items():
            edges += 1
            if target not in services:
                problems.append(f"{name} depends on {target!r}, which is no service")
            elif "healthcheck" in services[target] and spec.get("condition") != "service_healthy":
                problems.append(f"{name} -> {target}: condition {spec.get('condition')!r}, want service_healthy")
    for name, service in services.items():
        pid = str(service.get("pid", ""))
        if pid.startswith("service:") and pid.removeprefix("service:") not in service.get("depends_on", {}):
            problems.append(f"{name} shares the pid namespace of {pid} without depending on it")
    assert edges >= 6, f"only {edges} depends_on edges: the start order is not expressed"
    assert not problems, "\n".join(problems)


def test_app_services_run_the_app_image_with_ray_usage_stats_off(services: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        service = services[name]
        assert service.get("build", {}).get("dockerfile") == DOCKERFILE.name, f"{name} is not built from {DOCKERFILE}"
        assert environment(service).get("RAY_USAGE_STATS_ENABLED") == "0", f"{name}: RAY_USAGE_STATS_ENABLED != 0"
    assert "ENV " in DOCKERFILE.read_text() and "RAY_USAGE_STATS_ENABLED=0" in DOCKERFILE.read_text()
    assert dockerfile_entrypoint() == ["sitn"]


def test_dockerfile_installs_the_lock_and_never_copies_data() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M), "base image must be python:3.11-slim"
    assert re.search(r"pip install .*-r requirements\.lock", text), "dependencies must come from requirements.lock"
    copies = [line for line in text.splitlines() if line.startswith(("COPY", "ADD"))]
    bad = [line for line in copies if re.search(r"\bshared\b|\bdata\b|\bvar\b|COPY \. ", line)]
    assert copies and not bad, f"the image must not copy the data set, run state or the whole context: {bad}"


# -- compose: ports and addresses ---------------------------------------------------------------------


def test_published_ports_match_the_application_defaults(services: dict[str, Any]) -> None:
    from serving.settings import ServingSettings
    from sitn.commands.kafka import DEFAULT_PORT as KAFKA_PORT
    from sitn.commands.serve import DEFAULT_BOOTSTRAP_SERVERS
    from stream.exporter import TelemetrySettings

    default_bootstrap_port = int(DEFAULT_BOOTSTRAP_SERVERS.rsplit(":", 1)[1])
    assert default_bootstrap_port == KAFKA_PORT
    expected = {
        "serving": ServingSettings().port,
        "learner": TelemetrySettings().dashboard_port,
        "kafka": KAFKA_PORT,
        "prometheus": 9090,
        "grafana": 3000,
    }
    got = {name: sorted(host for _, host, _ in published(services[name])) for name in expected}
    assert got == {name: [port] for name, port in expected.items()}
    unpublished = {name for name in services if name not in expected and services[name].get("ports")}
    assert not unpublished, f"services that should publish nothing: {sorted(unpublished)}"
    exposed = {(name, ip) for name in expected for ip, _, _ in published(services[name]) if ip != "127.0.0.1"}
    assert not exposed, f"published beyond the host's loopback (the apps default to local only): {exposed}"


def test_processes_behind_published_ports_listen_where_they_are_published(services: dict[str, Any]) -> None:
    """The container port of a mapping is the one the process binds, on all interfaces of the container."""
    from serving.settings import ServingSettings
    from stream.exporter import TelemetrySettings

    (serve_argv,) = sitn_invocations(services["serving"])
    serve_env = environment(services["serving"])
    serve_host = flag_value(serve_argv, "--host") or serve_env.get("SITN_SERVING_HOST", ServingSettings().host)
    serve_port = int(flag_value(serve_argv, "--port") or serve_env.get("SITN_SERVING_PORT", ServingSettings().port))
    assert (serve_host, [c for _, _, c in published(services["serving"])]) == ("0.0.0.0", [serve_port])

    learner_env = environment(services["learner"])
    dash_host = learner_env.get("SITN_METRICS_DASHBOARD_HOST", TelemetrySettings().dashboard_host)
    dash_port = int(learner_env.get("SITN_METRICS_DASHBOARD_PORT", TelemetrySettings().dashboard_port))
    assert (dash_host, [c for _, _, c in published(services["learner"])]) == ("0.0.0.0", [dash_port])
    assert learner_env.get("SITN_METRICS_HOST") == "0.0.0.0", "actor exporters must be reachable from Prometheus"
    assert "SITN_METRICS_ADVERTISE_HOST" not in learner_env, (
        "one advertise_host is shipped to every actor on every node; leave it unset so each uses its node IP")


def test_kafka_clients_use_an_advertised_listener(services: dict[str, Any]) -> None:
    kafka_env = environment(services["kafka"])
    advertised = {entry.split("://", 1)[1] for entry in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    listeners = {entry.split("://", 1)[0]: int(entry.rsplit(":", 1)[1]) for entry in kafka_env["KAFKA_LISTENERS"].split(",")}
    clients = {}
    for name in ("learner", "serving"):
        (argv,) = sitn_invocations(services[name])
        clients[name] = flag_value(argv, "--kafka-bootstrap-servers")
    assert clients == {"learner": "kafka:9092", "serving": "kafka:9092"}
    assert set(clients.values()) <= advertised, f"{clients} not in the advertised listeners {advertised}"
    # the host-side mapping reaches the listener that advertises the host's own address
    ((_, host_port, container_port),) = published(services["kafka"])
    host_listener = [n for n, port in listeners.items() if port == container_port]
    assert host_listener and f"127.0.0.1:{host_port}" in advertised


def test_kafka_image_is_the_release_the_tests_run_against(services: dict[str, Any]) -> None:
    from sitn.broker import KAFKA_VERSION

    assert services["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"


# -- compose: the application's settings and CLI ------------------------------------------------------


def test_every_sitn_variable_is_a_settings_field(services: dict[str, Any]) -> None:
    classes = settings_classes()
    problems, seen = [], 0
    for name, service in services.items():
        for var in environment(service):
            if not var.startswith("SITN_"):
                continue
            seen += 1
            matches = settings_field(var, classes)
            if len(matches) != 1:
                problems.append(f"{name}: {var} maps to {[(c.__name__, f) for c, f in matches]} "
                                f"(prefixes {sorted(classes)})")
    assert seen >= 5, f"only {seen} SITN_* variables found in {COMPOSE}"
    assert not problems, "\n".join(problems)


def test_settings_field_rejects_a_misspelt_variable() -> None:
    classes = settings_classes()
    assert settings_field("SITN_METRICS_TARGETS_DIR", classes)
    assert settings_field("SITN_KAFKA_BOOTSTRAP_SERVERS", classes)
    assert settings_field("SITN_METRICS_TARGET_DIR", classes) == []
    assert settings_field("SITN_SERVING_BIND", classes) == []


@pytest.mark.parametrize("service_name", sorted(APP_SERVICES))
def test_sitn_variables_have_valid_values(service_name: str, services: dict[str, Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each settings class reads the service's environment without a validation error."""
    import os

    for var in list(os.environ):
        if var.startswith("SITN_"):
            monkeypatch.delenv(var)
    env = environment(services[service_name])
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    for prefix, cls in settings_classes().items():
        ours = {var for var in env if var.startswith("SITN_") and settings_field(var, {prefix: cls})}
        settings = cls()
        for var in ours:
            field = var[len(prefix):].lower()
            assert str(getattr(settings, field)) == env[var], f"{service_name}: {var} did not reach {cls.__name__}.{field}"


def test_sitn_commands_parse_with_the_real_cli(services: dict[str, Any]) -> None:
    commands = {}
    for name in APP_SERVICES:
        for argv in sitn_invocations(services[name]):
            args = parse_sitn(argv)
            assert callable(getattr(args, "func", None)), f"{name}: `sitn {shlex.join(argv)}` names no command"
            commands[name] = args.command
    assert commands == {"learner": "run", "serving": "serve"}


def test_cli_check_rejects_an_unknown_flag() -> None:
    with pytest.raises(AssertionError, match=r"unknown arguments|does not parse"):
        parse_sitn(["run", "--ray-adress", "ray-head:6379"])


def test_shell_commands_are_split_into_sitn_invocations() -> None:
    service = {"entrypoint": ["/bin/sh", "-c"], "command": ["ray start --x=1 && exec sitn run --port 1; echo"]}
    assert sitn_invocations(service) == [["run", "--port", "1"]]
    assert sitn_invocations({"entrypoint": ["ray"], "command": ["start"]}) == []


def test_ray_nodes_join_the_head(services: dict[str, Any]) -> None:
    head = services["ray-head"]["command"]
    port = flag_value(head, "--port")
    assert "--head" in head and port
    worker = services["ray-worker"]["command"]
    assert flag_value(worker, "--address") == f"ray-head:{port}"
    learner_script = " ".join(services["learner"]["command"])
    assert f"ray start --address=ray-head:{port}" in learner_script, "the driver needs a local raylet"
    (run_argv,) = sitn_invocations(services["learner"])
    assert flag_value(run_argv, "--ray-address") == f"ray-head:{port}"


def test_replica_follows_what_the_learner_publishes(services: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each side's settings built as its command builds them (sitn.cli_settings), from its own command line
    and environment: the replica reads the topic the learner writes, vectors of the learner's width."""
    import sitn.commands.run as run_command
    import sitn.commands.serve as serve_command

    def built(name: str, flags: Any) -> Any:
        (argv,) = sitn_invocations(services[name])
        env = environment(services[name])
        for var in [v for v in os.environ if v.startswith("SITN_")]:
            monkeypatch.delenv(var)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        return flags.build(parse_sitn(argv), environ=env)

    run_flags, _, learner_stream_flags = run_command._flags()
    _, serve_learner_flags, serve_stream_flags = serve_command._flags()
    assert (built("serving", serve_stream_flags).topic_embedding_updates
            == built("learner", learner_stream_flags).topic_embedding_updates)
    assert built("serving", serve_learner_flags).learner_dim == built("learner", run_flags).learner_dim
    assert not {"SITN_SERVING_DIM", "SITN_SERVING_UPDATES_TOPIC"} & set(environment(services["serving"])), (
        "serving's width and topic are the learner's and the stream's fields: set those (x-published-env)")


def test_replay_data_is_the_shared_data_set_mounted_read_only(services: dict[str, Any], events_csv: Path) -> None:
    learner = services["learner"]
    (run_argv,) = sitn_invocations(learner)
    events = PurePosixPath(flag_value(run_argv, "--events") or environment(learner)["SITN_RUN_EVENTS"])
    matches = [(target, src, ro) for target, (src, ro) in mounts(learner).items()
               if events.is_relative_to(target)]
    assert len(matches) == 1, f"{events} is not under exactly one mount of the learner"
    target, source, read_only = matches[0]
    assert read_only, f"the data set must be mounted read-only, got {source}:{target}"
    host_path = (REPO / source / events.relative_to(target)).resolve()
    # compose's relative source assumes the conventional layout: ../shared beside the checkout
    assert host_path == (REPO.parent / "shared" / "data" / EVENTS_CSV.relative_to(SHARED_DATA)).resolve()
    assert host_path == events_csv.resolve() and host_path.is_file()


def test_run_directory_is_one_volume_on_every_ray_node(services: dict[str, Any]) -> None:
    (run_argv,) = sitn_invocations(services["learner"])
    run_dir = PurePosixPath(flag_value(run_argv, "--run-dir") or environment(services["learner"])["SITN_RUN_RUN_DIR"])
    sources = set()
    for name in ACTOR_NODES:
        found = [(t, src) for t, (src, ro) in mounts(services[name]).items() if run_dir.is_relative_to(t) and not ro]
        assert len(found) == 1, f"{name}: the run dir {run_dir} (checkpoints written by actors) is not mounted"
        sources.add(found[0])
    assert len(sources) == 1 and "/" not in next(iter(sources))[1], f"not one named volume: {sources}"


# -- Prometheus ---------------------------------------------------------------------------------------


def test_file_sd_reads_the_targets_volume_every_process_writes(services: dict[str, Any],
                                                                prometheus: dict[str, Any]) -> None:
    targets_dir = environment(services["learner"])["SITN_METRICS_TARGETS_DIR"]
    volumes = {name: mounts(services[name]).get(targets_dir) for name in ACTOR_NODES}
    assert all(v is not None and not v[1] for v in volumes.values()), (
        f"every Ray node must mount a writable volume at {targets_dir}: {volumes}")
    (volume,) = {v[0] for v in volumes.values() if v}
    prom_path = [t for t, (src, _) in mounts(services["prometheus"]).items() if src == volume]
    assert len(prom_path) == 1, f"prometheus does not mount volume {volume!r}"
    globs = [f for job in prometheus["scrape_configs"] for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    assert globs, "no file_sd_configs in prometheus.yml"
    assert {str(PurePosixPath(g).parent) for g in globs} == {prom_path[0]}
    assert all(g.endswith(".json") for g in globs), "stream.exporter writes <component>-<node>-<pid>.json"


def test_prometheus_settings_and_static_targets(services: dict[str, Any], prometheus: dict[str, Any]) -> None:
    assert prometheus["global"]["scrape_interval"] == "5s"
    config_dir = [t for t, (src, _) in mounts(services["prometheus"]).items()
                  if (REPO / src).resolve() == PROMETHEUS.parent.resolve()]
    assert config_dir and f"--config.file={config_dir[0]}/{PROMETHEUS.name}" in services["prometheus"]["command"]
    for rule_file in prometheus["rule_files"]:
        assert (PROMETHEUS.parent / rule_file).is_file(), f"rule file {rule_file} missing"
    assert ALERTS.name in prometheus["rule_files"]
    static = [(job["job_name"], t) for job in prometheus["scrape_configs"]
              for sc in job.get("static_configs", []) for t in sc["targets"]]
    checked = 0
    for job, target in static:
        host, port = target.rsplit(":", 1)
        if host in ("127.0.0.1", "localhost"):
            continue
        assert host in services, f"{job}: {target} names no compose service"
        assert int(port) in [c for _, _, c in published(services[host])], f"{job}: {host} does not listen on {port}"
        checked += 1
    assert checked >= 1 and any(t.startswith("serving:") for _, t in static), (
        "the standalone replica registers in no targets file: it must be a static target")


def metric_families() -> dict[str, str]:
    """name -> type of every sitn_* family the application's registries hold."""
    from prometheus_client import REGISTRY

    for module in METRIC_MODULES:  # importing a module registers its metrics
        importlib.import_module(module)
    registries = [REGISTRY, importlib.import_module("sitn.dashboard").REGISTRY]  # + the driver's own /metrics
    return {family.name: family.type for registry in registries for family in registry.collect()
            if family.name.startswith("sitn_")}


SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("", "_count", "_sum", "_created"), "gauge": ("",), "info": ("_info",)}


def exposed_metric_names() -> set[str]:
    """Every sample name the application's registries expose."""
    return {name + s for name, kind in metric_families().items() for s in SUFFIXES.get(kind, ("",))}


def used_metric_names(alerts: list[dict[str, Any]], dashboard: dict[str, Any]) -> dict[str, set[str]]:
    """metric name -> where it is used (alert expressions and annotations, dashboard queries)."""
    used: dict[str, set[str]] = {}
    for rule in alerts:
        texts = [rule["expr"], *rule.get("annotations", {}).values()]
        for name in METRIC_RE.findall(" ".join(texts)):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            for name in METRIC_RE.findall(target["expr"]):
                used.setdefault(name, set()).add(f"panel {panel['id']} {panel['title']!r}")
    return used


@pytest.mark.parametrize("group", ["application", "drift"])
def test_metric_names_in_alerts_and_dashboard_exist(group: str, alerts: list[dict[str, Any]],
                                                    dashboard: dict[str, Any]) -> None:
    names = exposed_metric_names()
    assert {"sitn_serving_freshness_seconds_bucket", "sitn_learner_steps_total", "sitn_drift_alarms_total"} <= names
    used = {n: w for n, w in used_metric_names(alerts, dashboard).items()
            if n.startswith("sitn_drift_") == (group == "drift")}
    assert len(used) >= (4 if group == "drift" else 20), f"too few {group} metrics used: {sorted(used)}"
    unknown = {n: sorted(w) for n, w in used.items() if n not in names}
    assert not unknown, f"metric names the code does not expose: {unknown}"


def test_metrics_catalogue_lists_every_metric_and_only_those() -> None:
    families = metric_families()
    documented = set(METRIC_RE.findall(METRICS_DOC.read_text()))
    primary = {name + ("_total" if kind == "counter" else "") for name, kind in families.items()}
    assert len(primary) >= 40, f"only {len(primary)} metric families found"
    assert not primary - documented, f"missing from {METRICS_DOC.name}: {sorted(primary - documented)}"
    exposed = exposed_metric_names()
    stale = {n for n in documented if n not in exposed and n not in families}
    assert not stale, f"{METRICS_DOC.name} names metrics the code does not define: {sorted(stale)}"


def test_alert_rules_are_complete(alerts: list[dict[str, Any]]) -> None:
    assert {rule["alert"] for rule in alerts} == ALERTS_EXPECTED
    for rule in alerts:
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{rule['alert']}: no for: duration"
        assert rule.get("labels", {}).get("severity") in ("critical", "warning"), f"{rule['alert']}: severity"
        assert {"summary", "description"} <= set(rule.get("annotations", {})), f"{rule['alert']}: annotations"
    freshness = next(r for r in alerts if r["alert"] == "SitnFreshnessP99High")
    assert "histogram_quantile(0.99" in freshness["expr"] and "sitn_serving_freshness_seconds_bucket" in freshness["expr"]


# -- Grafana ------------------------------------------------------------------------------------------


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def test_dashboard_panels_have_unique_ids_and_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    datasources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    (uid,) = [ds["uid"] for ds in datasources if ds["type"] == "prometheus"]
    panels = list(dashboard_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    queried = [p for p in panels if p["type"] != "row"]
    assert len(queried) >= 25 and all(p["type"] == "timeseries" for p in queried)
    for panel in queried:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, f"panel {panel['id']}"
        assert panel["targets"], f"panel {panel['id']} {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == uid, f"panel {panel['id']}"
            assert target["expr"].strip(), f"panel {panel['id']}: empty query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"panel {panel['id']}: duplicate refIds"
    assert 36 <= dashboard["schemaVersion"] <= 41


def test_driver_page_queries_are_the_grafana_panels_text_where_they_overlap(dashboard: dict[str, Any]) -> None:
    from sitn.promql import QUERIES

    grafana = {t["expr"] for p in dashboard_panels(dashboard) for t in p.get("targets", [])}
    shared = {q.series: q.expr for q in QUERIES if q.in_grafana}
    assert len(shared) >= 12, f"only {len(shared)} shared expressions"
    missing = {series: expr for series, expr in shared.items() if expr not in grafana}
    assert not missing, f"sitn.promql expressions marked in_grafana that no Grafana panel runs: {missing}"
    own = {q.series: q.expr for q in QUERIES if not q.in_grafana and q.expr in grafana}
    assert not own, f"sitn.promql expressions the Grafana dashboard runs too: mark them in_grafana: {own}"
    used = {n for q in QUERIES for n in METRIC_RE.findall(q.expr)}
    assert not used - exposed_metric_names(), f"metric names the code does not expose: {used - exposed_metric_names()}"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards(services: dict[str, Any]) -> None:
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    host, port = datasource["url"].removeprefix("http://").split(":")
    assert host == "prometheus" and int(port) in [c for _, _, c in published(services[host])]
    grafana_mounts = {(REPO / src).resolve(): target for target, (src, _) in mounts(services["grafana"]).items()
                      if src.startswith(".")}
    assert grafana_mounts.get((GRAFANA / "provisioning").resolve()) == "/etc/grafana/provisioning"
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert grafana_mounts.get(DASHBOARD.parent.resolve()) == provider["options"]["path"]


# -- promtool -----------------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        skip_or_fail("promtool is not on PATH (Debian package `prometheus` provides it)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False)


def test_promtool_checks_config_and_rules() -> None:
    config = promtool("check", "config", str(PROMETHEUS))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_promtool_parses_every_dashboard_query(dashboard: dict[str, Any], tmp_path: Path) -> None:
    from sitn.promql import QUERIES

    rules = [{"record": f"dashboard:panel_{p['id']}_{t['refId']}", "expr": t["expr"].replace("$__rate_interval", "1m")}
             for p in dashboard_panels(dashboard) for t in p.get("targets", [])]
    rules += [{"record": f"driver_page:{q.series}", "expr": q.render(30)} for q in QUERIES]  # the driver's page
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [{"record": "x:y", "expr": "sum(rate(x[1m])"}]}]}))
    assert promtool("check", "rules", str(bad)).returncode != 0


# (alert, input series, evaluation time, labels of the expected alert or None for no alert)
ALERT_CASES: list[tuple[str, list[tuple[str, str]], str, dict[str, str] | None]] = [
    ("SitnFreshnessP99High", [('sitn_serving_freshness_seconds_bucket{le="2.0"}', "0+0x20"),
                              ('sitn_serving_freshness_seconds_bucket{le="3.0"}', "0+60x20"),
                              ('sitn_serving_freshness_seconds_bucket{le="+Inf"}', "0+60x20")], "15m", {}),
    ("SitnFreshnessP99High", [('sitn_serving_freshness_seconds_bucket{le="0.5"}', "0+60x20"),
                              ('sitn_serving_freshness_seconds_bucket{le="2.0"}', "0+60x20"),
                              ('sitn_serving_freshness_seconds_bucket{le="+Inf"}', "0+60x20")], "15m", None),
    ("SitnNoTrainingProgress", [("sitn_learner_steps_total", "100+0x20"),
                                ('sitn_stream_consumer_lag_records{partition="0"}', "500+0x20")], "15m", {}),
    ("SitnNoTrainingProgress", [("sitn_learner_steps_total", "100+10x20"),
                                ('sitn_stream_consumer_lag_records{partition="0"}', "500+0x20")], "15m", None),
    ("SitnNoTrainingProgress", [('sitn_stream_consumer_lag_records{partition="0"}', "500+0x20")], "15m", {}),
    ("SitnConsumerLagHigh", [('sitn_stream_consumer_lag_records{partition="1",instance="c1"}', "20000+1000x20")],
     "15m", {"partition": "1"}),
    ("SitnConsumerLagHigh", [('sitn_stream_consumer_lag_records{partition="1",instance="c1"}', "20000+0x20")],
     "15m", None),
    ("SitnDeadLettersHigh", [("sitn_stream_records_consumed_total", "0+1000x20"),
                             ('sitn_stream_dead_letters_total{reason="bad_json"}', "0+50x20")],
     "15m", {"reason": "bad_json"}),
    ("SitnDeadLettersHigh", [("sitn_stream_records_consumed_total", "0+1000x20"),
                             ('sitn_stream_dead_letters_total{reason="bad_json"}', "0+1x20")], "15m", None),
    ("SitnHttp5xxRate", [('sitn_serving_http_request_seconds_count{route="/recommend",status="500"}', "0+10x20"),
                         ('sitn_serving_http_request_seconds_count{route="/recommend",status="200"}', "0+100x20")],
     "15m", {"route": "/recommend"}),
    ("SitnDriftAlarmActive", [('sitn_drift_alarm_active{signal="input_domain_mix"}', "1x10")], "5m",
     {"signal": "input_domain_mix"}),
    ("SitnDriftAlarmActive", [('sitn_drift_alarm_active{signal="input_domain_mix"}', "0x10")], "5m", None),
    ("SitnPublishGateClosed", [("sitn_learner_publish_gate_closed", "1x20")], "10m", {}),
    ("SitnPublishGateClosed", [("sitn_learner_publish_gate_closed", "1x3 0x16")], "10m", None),
    ("SitnServingBaseline", [('sitn_learner_served_ranker{served_by="cooccurrence"}', "1x40"),
                             ('sitn_learner_served_ranker{served_by="model"}', "0x40")], "35m", {"served_by": "cooccurrence"}),
    ("SitnServingBaseline", [('sitn_learner_served_ranker{served_by="cooccurrence"}', "1x20 0x20"),
                             ('sitn_learner_served_ranker{served_by="model"}', "0x20 1x20")], "35m", None),
    ("SitnServingBaseline", [('sitn_learner_served_ranker{served_by="fused"}', "1x40"),  # a learnt ranker: fine
                             ('sitn_learner_served_ranker{served_by="model"}', "0x40")], "35m", None),
    ("SitnTargetDown", [('up{job="sitn",instance="10.0.0.5:41234",component="learner"}', "0x10")], "5m",
     {"job": "sitn", "instance": "10.0.0.5:41234", "component": "learner"}),
]


def test_promtool_unit_tests_every_alert(alerts: list[dict[str, Any]], tmp_path: Path) -> None:
    """Each alert fires on a series built to trip it and stays quiet on one built not to (annotations are
    templates and not compared: the rules are copied without them)."""
    assert {case[0] for case in ALERT_CASES} == ALERTS_EXPECTED
    severity = {rule["alert"]: rule["labels"]["severity"] for rule in alerts}
    rules = tmp_path / "alerts_without_annotations.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "sitn", "rules": [
        {k: v for k, v in rule.items() if k != "annotations"} for rule in alerts]}]}))
    tests = []
    for alert, series, eval_time, labels in ALERT_CASES:
        expected = [] if labels is None else [{"exp_labels": {**labels, "severity": severity[alert]}}]
        tests.append({"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series],
                      "alert_rule_test": [{"eval_time": eval_time, "alertname": alert, "exp_alerts": expected}]})
    unit = tmp_path / "alerts_test.yml"
    unit.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": tests}))
    result = promtool("test", "rules", str(unit))
    assert result.returncode == 0, result.stdout + result.stderr
