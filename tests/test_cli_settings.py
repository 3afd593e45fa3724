"""The ``sitn`` options generated from the settings classes (``sitn.cli_settings``): one flag per field with
its variable and default in the help, flag over environment over default, errors that name the flag, and
derived fields that follow their owner."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest

import sitn.commands.eval as eval_command
import sitn.commands.replay as replay_command
import sitn.commands.run as run_command
import sitn.commands.serve as serve_command
from learner.online.drift import DriftSettings
from serving.settings import ServingSettings
from sitn.cli import build_parser, main
from sitn.cli_settings import SettingsFlags
from sitn.commands import events_file_flags, learner_shape_flags
from sitn.settings import RunSettings
from stream.errors import ConfigError
from stream.exporter import TelemetrySettings
from stream.settings import StreamSettings

COMMANDS: dict[str, list[SettingsFlags]] = {
    "run": [*run_command._flags(), run_command._telemetry_flags()],
    "serve": list(serve_command._flags()),
    "replay": [events_file_flags(), replay_command._stream_flags()],
    "train": [events_file_flags(), learner_shape_flags()],
    "inspect": [events_file_flags("dead_letter_max_ratio")],
    "eval": [learner_shape_flags()],
}
SETTINGS_CLASSES = (RunSettings, ServingSettings, StreamSettings, TelemetrySettings, DriftSettings)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SITN_* variable of the machine running the tests leaks in."""
    for var in [v for v in os.environ if v.startswith("SITN_")]:
        monkeypatch.delenv(var)


def subparser(command: str) -> argparse.ArgumentParser:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices[command]


def option_helps(command: str) -> dict[str, str]:
    return {flag: action.help or "" for action in subparser(command)._actions for flag in action.option_strings}


def run_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


# -- every field has a flag, its help names the variable and the default ------------------------------


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_field_has_a_flag_naming_its_variable_and_default(command: str) -> None:
    helps = option_helps(command)
    checked = 0
    for flags in COMMANDS[command]:
        for field in flags.fields:
            flag = flags.flag(field)
            assert flag in helps, f"sitn {command}: no {flag} for {flags.model.__name__}.{field}"
            assert f"env {flags.env_var(field)}" in helps[flag], helps[flag]
            assert "[default: " in helps[flag] and helps[flag].count("default:") == 1, helps[flag]  # no hand-written one
            checked += 1
    assert checked == sum(len(flags.fields) for flags in COMMANDS[command])


def test_the_main_settings_of_run_and_serve_are_all_flags_but_secrets_and_derived_fields() -> None:
    run_flags, _, _ = run_command._flags()
    assert set(run_flags.fields) == set(RunSettings.model_fields)  # every one, none left to the environment alone
    serving_flags, _, _ = serve_command._flags()
    assert set(ServingSettings.model_fields) - set(serving_flags.fields) == {"dim", "admin_token"}
    replay_flags = replay_command._stream_flags()
    assert set(StreamSettings.model_fields) - set(replay_flags.fields) == {
        "consumer_group", "batch_size", "poll_timeout_s", "sasl_plain_password", "ssl_password"}


def test_help_texts_are_generated_exactly() -> None:
    helps = option_helps("run")
    assert helps["--batch-size"] == "examples per learner step [default: 256; env SITN_RUN_BATCH_SIZE]"
    assert helps["--fused-weights"].endswith("[default: 0.25,0.5,1.0,2.0,4.0; env SITN_RUN_FUSED_WEIGHTS]")
    assert helps["--gate-enabled"].endswith("[default: on; env SITN_RUN_GATE_ENABLED]")
    assert helps["--kafka-bootstrap-servers"] == ("the Kafka brokers to connect to, host:port[,host:port]; unset = no "
                                                  "Kafka: the embedded file-backed log [default: unset; env "
                                                  "SITN_KAFKA_BOOTSTRAP_SERVERS]")
    serve = option_helps("serve")
    assert serve["--dim"] == ("embedding width d of the SITN model (serving's dim follows it) "
                              "[default: 64; env SITN_RUN_LEARNER_DIM (also read: SITN_SERVING_DIM)]")
    assert serve["--kafka-bootstrap-servers"] == (
        "the Kafka brokers to connect to, host:port[,host:port] "
        "[default: 127.0.0.1:9092; env SITN_KAFKA_BOOTSTRAP_SERVERS (also read: SITN_SERVING_KAFKA_BOOTSTRAP_SERVERS)]")


def test_secrets_are_environment_only() -> None:
    for command in ("run", "serve", "replay"):
        helps = option_helps(command)
        assert not {"--admin-token", "--sasl-plain-password", "--ssl-password"} & set(helps), command
    with pytest.raises(ValueError, match=r"ServingSettings.admin_token is a secret: environment only, never a flag"):
        SettingsFlags(ServingSettings, ("admin_token",))


def test_flags_keep_their_names_from_before() -> None:
    """README, docker-compose.yml, infra/run.sh and the tests use these."""
    run_helps, serve_helps = option_helps("run"), option_helps("serve")
    for flag in ("--events", "--source", "--target", "--rate-events-per-s", "--limit", "--time-unit", "--max",
                 "--exit-after-replay", "--run-dir", "--ray-address", "--consumers", "--serving-replicas",
                 "--batch-size", "--cooc-max-neighbours", "--learner-dim", "--learner-max-len", "--warm-start",
                 "--max-lag-events", "--host", "--port", "--kafka-bootstrap-servers", "--partitions"):
        assert flag in run_helps, flag
    for flag in ("--host", "--port", "--kafka-bootstrap-servers", "--updates-topic", "--dim", "--index-factory",
                 "--workers"):
        assert flag in serve_helps, flag
    assert {"--dim", "--n-views", "--max-len", "--time-unit", "--limit"} <= set(option_helps("train"))
    assert {"--dim", "--n-views", "--max-len"} <= set(option_helps("eval"))
    assert {"--time-unit", "--limit", "--dead-letter-max-ratio"} <= set(option_helps("inspect"))
    assert {"--time-unit", "--limit"} <= set(option_helps("replay"))


# -- precedence -------------------------------------------------------------------------------------------


def test_a_flag_beats_the_environment_which_beats_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    run_flags, _, _ = run_command._flags()
    assert run_flags.build(run_args()).batch_size == 256
    monkeypatch.setenv("SITN_RUN_BATCH_SIZE", "100")
    monkeypatch.setenv("SITN_RUN_GATE_ENABLED", "true")
    monkeypatch.setenv("SITN_RUN_FUSED_WEIGHTS", "[1, 3]")
    monkeypatch.setenv("SITN_RUN_LEARNER_LR", "0.001")
    from_env = run_flags.build(run_args())
    assert (from_env.batch_size, from_env.gate_enabled, from_env.fused_weights, from_env.learner_lr) == (
        100, True, (1.0, 3.0), 0.001)
    given = run_flags.build(run_args("--batch-size", "7", "--no-gate-enabled", "--fused-weights", "2,5"))
    assert (given.batch_size, given.gate_enabled, given.fused_weights) == (7, False, (2.0, 5.0))
    assert given.learner_lr == 0.001  # only the flags given override: the rest still come from the environment
    assert run_flags.build(run_args("--fused-weights", "")).fused_weights == ()  # empty: no fused ranker


def test_types_come_from_the_annotations() -> None:
    run_flags, _, _ = run_command._flags()
    run = run_flags.build(run_args("--events", "e.csv", "--time-unit", "ms", "--max-lag-events", "9",
                                   "--rate-events-per-s", "2.5", "--exit-after-replay"))
    assert (run.events, run.time_unit, run.max_lag_events, run.rate_events_per_s, run.exit_after_replay) == (
        Path("e.csv"), "ms", 9, 2.5, True)
    serving_flags, _, _ = serve_command._flags()
    serving = serving_flags.build(serve_args("--index-search-params", '{"efSearch": 64}', "--no-index-background-merge"))
    assert (serving.index_search_params, serving.index_background_merge) == ({"efSearch": 64}, False)
    stream = replay_command._stream_flags().build(
        build_parser().parse_args(["replay", "--events", "e.csv", "--domains", "book,movie",
                                   "--security-protocol", "SSL"]))
    assert (stream.domains, stream.security_protocol) == (("book", "movie"), "SSL")


# -- errors name the flag ------------------------------------------------------------------------------------


def test_a_refused_flag_value_is_an_error_naming_the_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["run", "--run-dir", str(tmp_path / "never"), "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == (
        "sitn run: error: --batch-size: Input should be greater than or equal to 1, got 0\n")
    assert not (tmp_path / "never").exists()  # refused before anything was started or created
    assert main(["serve", "--port", "70000"]) == 2
    assert capsys.readouterr().err == "sitn serve: error: --port: Input should be less than or equal to 65535\n"


def test_a_refused_variable_is_an_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    run_flags, _, _ = run_command._flags()
    monkeypatch.setenv("SITN_RUN_CONSUMERS", "0")
    with pytest.raises(ConfigError, match=r"^--consumers / SITN_RUN_CONSUMERS: Input should be greater than or "
                                          r"equal to 1, got '0'$"):
        run_flags.build(run_args())
    monkeypatch.delenv("SITN_RUN_CONSUMERS")
    with pytest.raises(ConfigError, match=r"^RunSettings: fused_weights must be distinct numbers in \(0, 1e6\), "
                                          r"got \[1.0, 1.0\]$"):
        run_flags.build(run_args("--fused-weights", "1,1"))
    _, learner_flags, _ = serve_command._flags()
    monkeypatch.setenv("SITN_SERVING_DIM", "0")
    with pytest.raises(ConfigError, match=r"^SITN_SERVING_DIM: Input should be greater than or equal to 1, got '0'$"):
        learner_flags.build(serve_args())


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["run", "--time-unit", "days"], "argument --time-unit: invalid choice: 'days'"),
    (["run", "--fused-weights", "1,a"], "argument --fused-weights: invalid comma-separated float list value: '1,a'"),
    (["serve", "--index-search-params", "{"], "argument --index-search-params: invalid JSON value: '{'"),
])
def test_a_value_of_the_wrong_type_is_refused_by_the_parser_naming_the_flag(
        argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_secret_is_never_echoed_in_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    serving_flags, _, _ = serve_command._flags()
    monkeypatch.setenv("SITN_SERVING_ADMIN_TOKEN", "short-secret")
    with pytest.raises(ConfigError) as exc:
        serving_flags.build(serve_args())
    assert str(exc.value) == "SITN_SERVING_ADMIN_TOKEN: admin_token must have at least 16 characters, got 12"
    assert "short-secret" not in str(exc.value)


# -- derived fields follow their owner ----------------------------------------------------------------------


def started(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def pipeline(run: Any, stream: Any, serving: Any, config: Any, run_dir: Path, telemetry: Any = None,
                 drift: Any = None) -> int:
        out.update(run=run, stream=stream, serving=serving, config=config)
        return 0

    monkeypatch.setattr(run_command, "run_pipeline", pipeline)
    args = run_args(*argv)
    assert args.func(args) == 0
    return out


def test_run_derives_servings_width_and_cap_and_the_learners_user_cap(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    monkeypatch.setenv("SITN_SERVING_DIM", "16")  # serving's own variable: not read, the width is the learner's
    monkeypatch.setenv("SITN_SERVING_COOC_MAX_NEIGHBOURS", "3")  # likewise, the run's cap decides
    monkeypatch.setenv("SITN_SERVING_MAX_USERS", "5000")  # serving owns this one; the learner follows it
    s = started(monkeypatch, ["--run-dir", str(tmp_path), "--learner-dim", "32", "--cooc-max-neighbours", "7",
                              "--source", "book", "--target", "movie"])
    assert s["config"].dim == s["serving"].dim == 32
    assert s["run"].cooc_max_neighbours == s["serving"].cooc_max_neighbours == 7
    assert s["config"].max_users == s["serving"].max_users == 5000
    assert s["stream"].domains == ("book", "movie")
    assert s["stream"].embedded_log_dir == (tmp_path / "log").resolve()


def test_servings_width_follows_a_warm_start_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The model file decides the learner's shape, so it decides serving's width too (not --learner-dim)."""
    import learner.core.warm_checkpoint
    from learner.core.config import SITNConfig

    monkeypatch.setattr(learner.core.warm_checkpoint, "warm_start_config", lambda path: (
        SITNConfig(dim=16, max_len=10), {"events": 10, "trained_until": 0.0, "epochs": 1}))
    s = started(monkeypatch, ["--run-dir", str(tmp_path), "--warm-start", str(tmp_path / "warm.pt")])
    assert (s["run"].learner_dim, s["config"].dim, s["serving"].dim) == (64, 16, 16)


def test_serve_reads_the_learners_width_and_the_streams_topic_and_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    import stream.kafka_login

    seen: dict[str, Any] = {}
    monkeypatch.setattr(stream.kafka_login, "check_kafka_login", lambda settings: None)
    monkeypatch.setattr(serve_command, "run_replica", lambda settings, stream: seen.update(s=settings, t=stream) or 0)

    def serve(*argv: str) -> tuple[int, str, str]:
        args = serve_args(*argv)
        assert args.func(args) == 0
        return seen["s"].dim, seen["t"].topic_embedding_updates, seen["t"].kafka_bootstrap_servers

    assert serve() == (64, "sitn.embedding-updates", "127.0.0.1:9092")  # this command's broker default
    monkeypatch.setenv("SITN_SERVING_DIM", "16")  # the older names still work
    monkeypatch.setenv("SITN_SERVING_UPDATES_TOPIC", "old-topic")
    monkeypatch.setenv("SITN_SERVING_KAFKA_BOOTSTRAP_SERVERS", "old:1")
    assert serve() == (16, "old-topic", "old:1")
    monkeypatch.setenv("SITN_RUN_LEARNER_DIM", "32")  # the owners' variables win over them
    monkeypatch.setenv("SITN_TOPIC_EMBEDDING_UPDATES", "updates")
    monkeypatch.setenv("SITN_KAFKA_BOOTSTRAP_SERVERS", "kafka:9092")
    assert serve() == (32, "updates", "kafka:9092")
    assert serve("--dim", "8", "--updates-topic", "t", "--kafka-bootstrap-servers", "k:1") == (8, "t", "k:1")


def test_a_tiny_width_is_the_models_to_refuse(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``sitn serve --dim 2`` is fine (tests serve 2-d vectors); the learner refuses a width its heads do not divide."""
    _, learner_flags, _ = serve_command._flags()
    assert learner_flags.build(serve_args("--dim", "2")).learner_dim == 2
    with pytest.raises(ValueError, match=r"n_heads must be a divisor of dim=3"):
        started(monkeypatch, ["--run-dir", str(tmp_path), "--learner-dim", "3"])


def test_train_and_run_share_the_models_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SITN_RUN_LEARNER_DIM", "32")
    args = build_parser().parse_args(["train", "--events", "e.csv", "--source", "movie", "--target", "book",
                                      "--output", "m.pt", "--until-fraction", "0.5", "--max-len", "20"])
    shape = learner_shape_flags().build(args)
    assert (shape.learner_dim, shape.learner_views, shape.learner_max_len) == (32, 1, 20)


def test_a_derived_field_cannot_also_be_a_flag() -> None:
    with pytest.raises(ValueError, match=r"ServingSettings.dim is derived from its owner and cannot also be a flag"):
        SettingsFlags(ServingSettings, ("dim",), derived=("dim",))
    with pytest.raises(ValueError, match=r"RunSettings has no field 'dimension'"):
        SettingsFlags(RunSettings, ("dimension",))


# -- what unset means, said where it is true -------------------------------------------------------------


def test_serve_help_no_longer_promises_an_embedded_log() -> None:
    """``sitn serve`` reads the updates topic from Kafka only; its broker defaults to ``sitn kafka start``'s."""
    embedded = "the Kafka brokers to connect to, host:port[,host:port]; unset = no Kafka: the embedded file-backed log"
    for command in ("run", "replay"):  # their default is unset: the embedded log
        assert option_helps(command)["--kafka-bootstrap-servers"].startswith(embedded), command
    serve_help = option_helps("serve")["--kafka-bootstrap-servers"]
    assert "embedded" not in serve_help and "unset" not in serve_help
    assert "embedded" not in subparser("serve").format_help()


def test_serve_refuses_a_broker_set_to_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set empty, the stream would mean the embedded log, which a replica does not have: an error naming the
    flag and the variable, before any connection."""
    monkeypatch.setattr(serve_command, "run_replica", lambda settings, stream: pytest.fail("a replica was started"))
    message = (r"^--kafka-bootstrap-servers / SITN_KAFKA_BOOTSTRAP_SERVERS: sitn serve reads the updates topic from "
               r"Kafka and needs host:port\[,host:port\], got an empty value$")
    args = serve_args("--kafka-bootstrap-servers", "")
    with pytest.raises(ConfigError, match=message):
        args.func(args)
    monkeypatch.setenv("SITN_KAFKA_BOOTSTRAP_SERVERS", "")
    args = serve_args()
    with pytest.raises(ConfigError, match=message):
        args.func(args)


def test_every_setting_that_can_be_a_flag_has_a_description() -> None:
    for model in (RunSettings, ServingSettings, StreamSettings, TelemetrySettings):
        assert [name for name, info in model.model_fields.items() if not info.description] == [], model.__name__
    helps = option_helps("replay")
    assert helps["--security-protocol"] == (
        "how clients reach the brokers: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT (a login, no TLS) or SASL_SSL (a login "
        "over TLS) [default: PLAINTEXT; env SITN_SECURITY_PROTOCOL]")
    assert helps["--ssl-cafile"] == (
        "PEM file of the CA certificates the brokers' certificates are checked against (SSL, SASL_SSL); unset = the "
        "system's default CAs [default: unset; env SITN_SSL_CAFILE]")


# -- the settings other commands share: one flag, one help text, one variable ------------------------------

# A hand-written option named like a settings field, and why it is not that field (it has no settings field
# of its own, so it stays hand-written). Any other option named like a field must be generated from it.
HAND_WRITTEN = {
    ("eval", "--events"): "the file to evaluate, required; RunSettings.events is what a run replays (optional)",
    ("train", "--events"): "the file to train on, required",
    ("inspect", "--events"): "the file to inspect, required",
    ("replay", "--events"): "the file to produce, required",
    ("generate", "--events"): "how many events to write (SyntheticConfig, SITN_GENERATE_EVENTS)",
    ("eval", "--source"): "required: the evaluation's domains, no default",
    ("eval", "--target"): "required: the evaluation's domains, no default",
    ("train", "--source"): "required: the warm start's domains, no default",
    ("train", "--target"): "required: the warm start's domains, no default",
    ("inspect", "--source"): "unset = every domain of the file, a value RunSettings.source does not have",
    ("inspect", "--target"): "unset = every domain of the file, a value RunSettings.target does not have",
    ("generate", "--source"): "the domain name written into the file (SyntheticConfig, SITN_GENERATE_SOURCE)",
    ("generate", "--target"): "the domain name written into the file (SyntheticConfig, SITN_GENERATE_TARGET)",
    ("generate", "--time-unit"): "how the generator writes the column (no auto), not how a run reads it",
    ("eval", "--limit"): "the offline evaluation's slice, recorded in its command, not a run's rows",
    ("eval", "--batch-size"): "the offline mini-batch (512), not the stream learner's step (256)",
    ("train", "--batch-size"): "the offline mini-batch (512), not the stream learner's step (256)",
    ("eval", "--torch-threads"): "this process's torch threads, not the learner actor's",
    ("train", "--torch-threads"): "this process's torch threads (default: torch's), not the learner actor's",
    ("kafka", "--port"): "the local broker's client port, not serving's HTTP port",
}


def test_no_hand_written_option_stands_in_for_a_settings_field() -> None:
    field_flags = {"--" + name.replace("_", "-") for model in SETTINGS_CLASSES for name in model.model_fields}
    generated = {(command, flags.flag(field)) for command, all_flags in COMMANDS.items()
                 for flags in all_flags for field in flags.fields}
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    hand_written = {(command, flag) for command, parser in commands.items() for action in parser._actions
                    for flag in action.option_strings if flag in field_flags and (command, flag) not in generated}
    assert hand_written == set(HAND_WRITTEN)


BASE_ARGV = {  # each command's required options
    "inspect": ["--events", "e.csv"],
    "replay": ["--events", "e.csv"],
    "train": ["--events", "e.csv", "--source", "movie", "--target", "book", "--output", "m.pt",
              "--until-fraction", "0.5"],
    "eval": ["--events", "e.csv", "--source", "movie", "--target", "book"],
}


@pytest.mark.parametrize(("command", "flag", "variable", "argv_value", "env_value", "expected"), [
    ("inspect", "--time-unit", "SITN_RUN_TIME_UNIT", "iso", "ms", ("auto", "ms", "iso")),
    ("inspect", "--limit", "SITN_RUN_LIMIT", "7", "5", (None, 5, 7)),
    ("inspect", "--dead-letter-max-ratio", "SITN_RUN_DEAD_LETTER_MAX_RATIO", "0.3", "0.2", (0.01, 0.2, 0.3)),
    ("replay", "--time-unit", "SITN_RUN_TIME_UNIT", "ordinal", "s", ("auto", "s", "ordinal")),
    ("replay", "--limit", "SITN_RUN_LIMIT", "7", "5", (None, 5, 7)),
    ("train", "--time-unit", "SITN_RUN_TIME_UNIT", "iso", "ms", ("auto", "ms", "iso")),
    ("train", "--limit", "SITN_RUN_LIMIT", "7", "5", (None, 5, 7)),
    ("eval", "--dim", "SITN_RUN_LEARNER_DIM", "16", "32", (64, 32, 16)),
    ("eval", "--n-views", "SITN_RUN_LEARNER_VIEWS", "4", "2", (1, 2, 4)),
    ("eval", "--max-len", "SITN_RUN_LEARNER_MAX_LEN", "20", "30", (50, 30, 20)),
])
def test_shared_options_take_the_flag_then_the_variable_then_the_default(
        command: str, flag: str, variable: str, argv_value: str, env_value: str, expected: tuple[Any, Any, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    (flags,) = [f for f in COMMANDS[command] if any(f.flag(field) == flag for field in f.fields)]
    (field,) = [field for field in flags.fields if flags.flag(field) == flag]
    assert flags.env_var(field) == variable

    def value(*argv: str) -> Any:
        return getattr(flags.build(build_parser().parse_args([command, *BASE_ARGV[command], *argv])), field)

    assert value() == expected[0]
    monkeypatch.setenv(variable, env_value)
    assert value() == expected[1]
    assert value(flag, argv_value) == expected[2]


def test_inspect_judges_the_file_by_the_runs_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: one row of four is a dead letter (25 %); the run's ratio decides the exit status."""
    events = tmp_path / "events.csv"
    events.write_text("timestamp,user_id,item_id,domain\n1400000000,a,m1,movie\n1400000100,a,b1,book\n"
                      "1400000200,b,m2,movie\n0,b,b2,book\n", encoding="utf-8")

    def inspect(*argv: str) -> tuple[int, dict[str, Any]]:
        code = main(["inspect", "--events", str(events), "--json", *argv])
        return code, json.loads(capsys.readouterr().out)

    code, report = inspect()
    assert (code, report["problems"]) == (1, ["would dead-letter 1 of 4 rows (25.0%), above the threshold of 1.0%"])
    assert report["time"]["requested"] == "auto"
    monkeypatch.setenv("SITN_RUN_DEAD_LETTER_MAX_RATIO", "0.5")
    monkeypatch.setenv("SITN_RUN_TIME_UNIT", "s")
    code, report = inspect()
    assert (code, report["problems"], report["time"]["requested"]) == (0, [], "s")
    code, report = inspect("--dead-letter-max-ratio", "0.1", "--limit", "3")  # the flags beat the variables
    assert (code, report["rows"], report["dead_letters"]) == (0, 3, 0)
    code, report = inspect("--dead-letter-max-ratio", "0.1")
    assert (code, report["problems"]) == (1, ["would dead-letter 1 of 4 rows (25.0%), above the threshold of 10.0%"])


def test_inspect_refuses_what_a_run_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--events", str(tmp_path / "e.csv"), "--dead-letter-max-ratio", "1"]) == 2
    assert capsys.readouterr().err == (
        "sitn inspect: error: --dead-letter-max-ratio: Input should be less than 1, got 1.0\n")


def test_eval_records_the_shape_it_took_from_the_learners_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SITN_RUN_LEARNER_DIM", "32")
    args = build_parser().parse_args(["eval", *BASE_ARGV["eval"], "--max-len", "20"])
    eval_command.resolve_budget(args)
    eval_command.resolve_shape(args)
    assert (args.dim, args.n_views, args.max_len) == (32, 1, 20)
    assert " --dim 32 --n-views 1 --max-len 20 " in eval_command.command_line(args)  # repeatable without the variable
    assert eval_command.sitn_configs(args)["sitn"]["dim"] == 32
    refused = build_parser().parse_args(["eval", *BASE_ARGV["eval"], "--dim", "0"])
    with pytest.raises(ConfigError, match=r"^--dim: Input should be greater than or equal to 1, got 0$"):
        eval_command.resolve_shape(refused)


def test_eval_help_shows_the_generated_default_once() -> None:
    """``sitn eval`` formats help with ArgumentDefaultsHelpFormatter; the generated options already say their
    default, so nothing is appended to them."""
    text = " ".join(subparser("eval").format_help().split())
    assert ("--dim INT embedding width d of the SITN model (serving's dim follows it) [default: 64; env "
            "SITN_RUN_LEARNER_DIM] --n-views INT") in text
    assert "SITN_RUN_LEARNER_MAX_LEN] (default" not in text
