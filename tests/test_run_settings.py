"""``sitn run`` builds the learner's SITNConfig from its settings: flags, environment, defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sitn.cli import build_parser
from sitn.settings import RunSettings


def started_config(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> Any:
    import sitn.commands.run as run_command

    started: dict[str, Any] = {}

    def pipeline(run: Any, stream: Any, serving: Any, config: Any, run_dir: Path, telemetry: Any = None,
                 drift: Any = None) -> int:
        started.update(run=run, config=config, serving=serving)
        return 0

    monkeypatch.setattr(run_command, "run_pipeline", pipeline)
    args = build_parser().parse_args(["run", *argv])
    assert args.func(args) == 0
    return started


def test_defaults_reach_the_learner_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started = started_config(monkeypatch, ["--run-dir", str(tmp_path)])
    config = started["config"]
    assert (config.dim, config.n_views, config.max_len) == (64, 1, 50)
    assert (config.replay_buffer_size, config.replay_ratio) == (20_000, 1.0)  # each event trains about twice
    assert config.lr == 8e-3  # the stream's own learning rate, not SITNConfig's offline 2e-3
    assert config.popularity_prior == 1.0  # the model ranks with the popularity prior
    assert started["run"].fused_weights == (0.25, 0.5, 1.0, 2.0, 4.0)


def test_flags_and_environment_reach_the_learner_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SITN_RUN_LEARNER_REPLAY_RATIO", "0.5")
    monkeypatch.setenv("SITN_RUN_LEARNER_LR", "0.001")
    monkeypatch.setenv("SITN_RUN_LEARNER_VIEWS", "2")
    monkeypatch.setenv("SITN_RUN_FUSED_WEIGHTS", "[1, 3]")
    monkeypatch.setenv("SITN_RUN_LEARNER_POPULARITY_PRIOR", "0")
    started = started_config(monkeypatch, ["--run-dir", str(tmp_path), "--learner-replay-buffer-size", "0",
                                           "--learner-max-len", "20"])
    config = started["config"]
    assert (config.n_views, config.max_len, config.replay_buffer_size, config.replay_ratio) == (2, 20, 0, 0.5)
    assert config.popularity_prior == 0.0
    assert config.lr == 0.001
    assert started["run"].fused_weights == (1.0, 3.0)


def test_bad_values_are_refused_naming_what_was_received() -> None:
    with pytest.raises(ValueError, match=r"fused_weights must be distinct numbers in \(0, 1e6\), got \[1.0, 1.0\]"):
        RunSettings(fused_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"learner_replay_ratio\n  Input should be greater than or equal to 0"):
        RunSettings(learner_replay_ratio=-1.0)


def test_cooccurrence_cap_reaches_the_learners_shadow_and_serving(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """One setting for both ends: the fused ranker serving answers with must count co-occurrence as the
    learner's shadow that chose its weight did."""
    from learner.core.config import SITNConfig
    from learner.core.learner import SITNLearner
    from learner.online.publisher import CallableTransport
    from learner.online.trainer import OnlineTrainer
    from serving.service import RecommendationService

    default = started_config(monkeypatch, ["--run-dir", str(tmp_path)])
    assert default["run"].cooc_max_neighbours == default["serving"].cooc_max_neighbours == 50
    started = started_config(monkeypatch, ["--run-dir", str(tmp_path), "--cooc-max-neighbours", "7"])
    assert started["run"].cooc_max_neighbours == started["serving"].cooc_max_neighbours == 7
    assert RecommendationService.from_settings(started["serving"]).cooccurrence.max_neighbours == 7
    uncapped = started["serving"].model_copy(update={"cooc_max_neighbours": 0})
    assert RecommendationService.from_settings(uncapped).cooccurrence.max_neighbours is None  # 0: every pair
    learner = SITNLearner(SITNConfig(dim=8, max_len=5), "movie", "book")
    trainer = OnlineTrainer(learner, CallableTransport(lambda batch: None), None, cooc_max_neighbours=7)
    assert trainer.shadow.cooc.max_neighbours == 7


def test_a_resumed_run_keeps_the_learner_settings_it_was_started_with(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from sitn.run_config import CONFIG_FILE

    first = started_config(monkeypatch, ["--run-dir", str(tmp_path)])["config"]
    stored = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert stored == first.to_dict()
    # the run was started by older code whose defaults differ (a switch off, another width): a later start
    # with no flags resumes it as it was trained instead of refusing its checkpoints
    stored.update(init_history_items=not first.init_history_items, dim=32)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(stored))
    capsys.readouterr()
    started = started_config(monkeypatch, ["--run-dir", str(tmp_path)])
    assert started["config"].init_history_items is (not first.init_history_items)
    assert started["config"].dim == 32 and started["serving"].dim == 32  # serving's width follows the run's
    told = capsys.readouterr().err
    assert "keeps the learner settings it was started with" in " ".join(told.split())
    assert "init_history_items" in told and "dim 32" in told


def test_a_resumed_run_refuses_a_learner_flag_it_was_not_started_with(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sitn.commands.run as run_command

    started_config(monkeypatch, ["--run-dir", str(tmp_path)])
    monkeypatch.setattr(run_command, "run_pipeline", lambda *a, **k: pytest.fail("started with the wrong settings"))
    args = build_parser().parse_args(["run", "--run-dir", str(tmp_path), "--learner-dim", "32"])
    capsys.readouterr()
    assert args.func(args) == 1
    told = " ".join(capsys.readouterr().err.split())
    assert "not started" in told and "dim 32 asked, 64 in the run" in told
    monkeypatch.setenv("SITN_RUN_LEARNER_LR", "0.5")  # the environment asks as explicitly as a flag
    args = build_parser().parse_args(["run", "--run-dir", str(tmp_path)])
    assert args.func(args) == 1
    assert "lr 0.5 asked, 0.008 in the run" in " ".join(capsys.readouterr().err.split())


def test_a_run_directory_from_before_the_config_file_takes_its_checkpoints_config(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from learner.core.config import SITNConfig
    from learner.core.learner import SITNLearner
    from learner.online.checkpoint_store import CheckpointStore
    from sitn.run_config import CONFIG_FILE

    trained = SITNConfig(dim=16, max_len=8, init_history_items=False, initial_item_capacity=16)
    CheckpointStore(tmp_path / "checkpoints").save(SITNLearner(trained, "movie", "book"), 7, {})
    started = started_config(monkeypatch, ["--run-dir", str(tmp_path)])
    config = started["config"]
    assert (config.dim, config.max_len, config.init_history_items) == (16, 8, False)
    assert config.lr == trained.lr and started["serving"].dim == 16
    assert (tmp_path / CONFIG_FILE).is_file()  # read once; later starts read the file
