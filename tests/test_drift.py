"""Drift detection: divergences against hand-computed values, exact alarms on seeded synthetic streams,
step detectors on a loss series with a step change, metrics, the drift log and checkpoint round trips."""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from learner.online.drift import DriftAlarm, DriftMonitor, DriftSettings, js_divergence, psi
from stream.synthetic import SyntheticConfig, SyntheticStream

BATCH = 256


def feed_stream(monitor: DriftMonitor, config: SyntheticConfig) -> list[DriftAlarm]:
    """What the trainer does: one observe_events call per training batch of 256 events."""
    alarms: list[DriftAlarm] = []
    for chunk in SyntheticStream(config).chunks():
        domains, items = chunk.domain_names(), chunk.item_ids()
        for i in range(0, len(domains), BATCH):
            alarms += monitor.observe_events(domains[i : i + BATCH], items[i : i + BATCH])
    return alarms


def brief(alarms: list[DriftAlarm]) -> list[tuple[str, str, int]]:
    return [(a.signal, a.detector, a.index) for a in alarms]


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- divergences -------------------------------------------------------------------------------------


def test_psi_and_js_match_hand_computed_values() -> None:
    # PSI = sum (c - r) ln(c / r): (0.25 - 0.5) ln(0.5) + (0.75 - 0.5) ln(1.5)
    assert psi([50, 50], [25, 75]) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5), abs=1e-12)
    assert psi([2, 1, 1], [1, 1, 2]) == pytest.approx(-0.25 * math.log(0.5) + 0.25 * math.log(2), abs=1e-12)
    # Pseudo counts: r = (10.5, 0.5) / 11, c = (5.5, 5.5) / 11.
    r, c = np.array([10.5, 0.5]) / 11, np.array([0.5, 0.5])
    assert psi([10, 0], [5, 5], pseudo_count=0.5) == pytest.approx(float(((c - r) * np.log(c / r)).sum()), abs=1e-12)
    assert psi([10, 0], [5, 5]) == math.inf  # an empty reference bin without smoothing
    assert psi([3, 3], [3, 3]) == 0.0
    # JS in bits: m = (0.375, 0.625).
    kl_p = 0.5 * math.log2(0.5 / 0.375) + 0.5 * math.log2(0.5 / 0.625)
    kl_q = 0.25 * math.log2(0.25 / 0.375) + 0.75 * math.log2(0.75 / 0.625)
    assert js_divergence([50, 50], [25, 75]) == pytest.approx(0.5 * (kl_p + kl_q), abs=1e-12)
    assert js_divergence([1, 0, 0], [0, 0, 7]) == 1.0  # disjoint supports: the maximum
    assert js_divergence([5, 0], [5, 0]) == 0.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: psi([1, 2], [1, 2, 3]), "histograms differ in length: reference 2, current 3"),
        (lambda: js_divergence([1, -1], [1, 1]), "reference must have no negative counts, got min -1.0"),
        (lambda: psi([0, 0], [1, 1]), "reference is empty (all counts 0 and pseudo_count 0)"),
        (lambda: js_divergence([], []), "reference must be a non-empty 1-d histogram, got shape (0,)"),
    ],
)
def test_divergences_reject_bad_histograms(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


# -- input distribution --------------------------------------------------------------------------------


def test_stationary_stream_raises_no_input_alarm() -> None:
    monitor = DriftMonitor(DriftSettings())
    assert feed_stream(monitor, SyntheticConfig(events=200_000, seed=0)) == []
    signals = monitor.state()["signals"]
    assert monitor.events_seen == 200_000
    assert signals["input_domain_mix"]["checks"] == 36  # (200k - 20k reference) / 5k
    assert signals["input_items_movie"]["checks"] == 23 and signals["input_items_book"]["checks"] == 8
    assert max(s["psi"] for s in signals.values()) < 0.05  # thresholds sit far above the noise


def test_domain_mix_shift_alarms_once_within_two_windows() -> None:
    """The shift lands late in a window: that window stays under the thresholds, the next one alarms;
    the new reference is collected after it, so the shifted stream does not alarm again."""
    monitor = DriftMonitor(DriftSettings())
    config = SyntheticConfig(events=200_000, seed=0, drift="domain_mix", drift_at_event=104_000)
    alarms = feed_stream(monitor, config)
    assert brief(alarms) == [("input_domain_mix", "psi", 110_000), ("input_domain_mix", "js", 110_000)]
    assert alarms[0].index - 104_000 <= 2 * monitor.settings.current_window_events
    assert alarms[0].value == pytest.approx(0.66, abs=0.05)  # 0.3 -> 0.7: 2 * 0.4 * ln(7/3) = 0.678
    assert alarms[0].threshold == 0.2 and alarms[1].threshold == 0.03
    assert alarms[0].index_unit == "event"


def test_popularity_shift_alarms_once_per_domain() -> None:
    monitor = DriftMonitor(DriftSettings())
    config = SyntheticConfig(events=200_000, seed=0, drift="popularity", drift_at_event=100_000)
    alarms = feed_stream(monitor, config)
    assert brief(alarms) == [
        ("input_items_movie", "psi", 107_036), ("input_items_movie", "js", 107_036),
        ("input_items_book", "psi", 116_835), ("input_items_book", "js", 116_835),
    ]
    # Each domain's windows count that domain's events: one window of 5000 at share 0.7 and 0.3.
    assert 107_036 - 100_000 <= 5_000 / 0.7 * 1.05
    assert 116_835 - 100_000 <= 5_000 / 0.3 * 1.05


def test_interest_swap_is_invisible_to_the_input_signals() -> None:
    config = SyntheticConfig(events=200_000, seed=0, drift="interest_swap", drift_at_event=100_000)
    assert feed_stream(DriftMonitor(DriftSettings()), config) == []


def test_windows_are_exact_whatever_the_batch_boundaries() -> None:
    settings = DriftSettings(reference_window_events=10, current_window_events=5)
    one = DriftMonitor(settings)
    many = DriftMonitor(settings)
    domains = ["a"] * 15 + ["b"] * 5 + ["a"] * 10
    items = ["i0"] * 30  # one item: the item signals never move
    whole = one.observe_events(domains, items)
    split = [a for i in range(0, 30, 7) for a in many.observe_events(domains[i : i + 7], items[i : i + 7])]
    assert brief(whole) == brief(split) == [
        ("input_domain_mix", "psi", 20), ("input_domain_mix", "js", 20),
    ]
    # After the alarm at event 20 a new reference starts: events 21..30 fill it, no check yet.
    assert one.state()["signals"]["input_domain_mix"]["collecting_reference"] is False
    assert one.state()["signals"]["input_domain_mix"]["checks"] == 2


def test_observe_events_checks_lengths_and_bounds_domains() -> None:
    monitor = DriftMonitor(DriftSettings(max_domains=2, reference_window_events=2, current_window_events=2))
    with pytest.raises(ValueError, match=r"^domains and item_ids must have the same length, got 2 and 1$"):
        monitor.observe_events(["a", "b"], ["x"])
    assert monitor.observe_events([], []) == []
    monitor.observe_events(["a", "b", "c", "d"], ["1", "2", "3", "4"])
    item_signals = sorted(n for n in monitor.state()["signals"] if n.startswith("input_items_"))
    assert item_signals == ["input_items_a", "input_items_b"]  # c and d are not tracked


# -- step signals ----------------------------------------------------------------------------------------


def step_series(seed: int, change_at: int, n: int, level: float, std: float, shift: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.r_[rng.normal(level, std, change_at), rng.normal(level + shift, std, n - change_at)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adwin_and_page_hinkley_catch_a_loss_step_and_stay_quiet_before(seed: int) -> None:
    monitor = DriftMonitor(DriftSettings(burn_in_steps=0))
    loss = step_series(seed, 3_000, 5_000, level=5.0, std=0.1, shift=0.1)  # +1 std at step 3000
    hr = step_series(seed + 10, 3_000, 5_000, level=0.2, std=0.01, shift=0.0)  # stationary
    alarms: list[DriftAlarm] = []
    for step, (x, y) in enumerate(zip(loss, hr, strict=True)):
        alarms += monitor.observe_step({"loss": x, "prequential_hr_at_10": y, "examples_per_s": 9e9 * x}, step)
    assert {a.signal for a in alarms} == {"loss"}  # not the stationary HR, not unwatched keys
    first = {a.detector: a.index for a in reversed(alarms)}
    assert sorted(first) == ["adwin", "page_hinkley"]
    assert all(3_000 <= step <= 3_150 for step in first.values())  # within 150 steps, never before
    assert len(alarms) == 2  # once per detector
    ph = next(a for a in alarms if a.detector == "page_hinkley")
    assert ph.value > ph.threshold == 50.0 and ph.index_unit == "step"


def test_exact_alarms_for_a_seeded_series_and_a_hit_rate_drop() -> None:
    monitor = DriftMonitor(DriftSettings(burn_in_steps=0))
    hr = step_series(0, 2_000, 3_000, level=0.2, std=0.01, shift=-0.03)
    alarms = [a for step, y in enumerate(hr) for a in monitor.observe_step({"prequential_hr_at_10": y}, step)]
    assert brief(alarms) == [("prequential_hr_at_10", "page_hinkley", 2_012), ("prequential_hr_at_10", "adwin", 2_019)]


def test_nan_is_skipped_and_min_observations_and_cooldown_hold() -> None:
    settings = DriftSettings(min_observations=10, cooldown_steps=50, ph_threshold_std=5.0, burn_in_steps=0)
    monitor = DriftMonitor(settings)
    for step in range(5):
        assert monitor.observe_step({"loss": math.nan, "loss_i2c": math.inf}, step) == []
    assert monitor.state()["signals"] == {}  # nothing finite seen yet
    values = [0.0, 1.0] * 20 + [50.0, 51.0] * 40  # a jump at the 41st value
    alarms = [a for step, v in enumerate(values) for a in monitor.observe_step({"loss": v}, 100 + step)]
    steps = [(a.detector, a.index) for a in alarms]
    assert ("page_hinkley", 140) in steps  # the first value after the jump
    by_detector: dict[str, list[int]] = {}
    for detector, step in steps:
        by_detector.setdefault(detector, []).append(step)
    for fired in by_detector.values():
        assert all(b - a >= 50 for a, b in itertools.pairwise(fired))  # cooldown
    assert monitor.state()["signals"]["loss"]["values"] == 120


def test_alarms_active_counts_the_signals_in_alarm_until_their_next_quiet_check() -> None:
    settings = DriftSettings(min_observations=10, cooldown_steps=5, ph_threshold_std=5.0, burn_in_steps=0)
    monitor = DriftMonitor(settings)
    assert monitor.alarms_active() == 0
    values = [0.0, 1.0] * 20 + [50.0] * 3 + [50.0, 51.0] * 40
    steps, active = [], []
    for step, v in enumerate(values):
        if monitor.observe_step({"loss": v}, step):
            steps.append(step)
        active.append(monitor.alarms_active())
    assert steps and steps[0] == 40  # the jump
    assert active[:40] == [0] * 40 and active[40] == 1  # in alarm from the jump
    for step in range(len(values), len(values) + 200):  # a quiet signal: back to 0 after the cooldown
        monitor.observe_step({"loss": 50.5}, step)
        active.append(monitor.alarms_active())
    assert active[-1] == 0
    assert monitor.observe_assignments("proto_user_k4", [100, 100, 100, 100], step=1) == []  # reference
    assert monitor.observe_assignments("proto_user_k4", [370, 10, 10, 10], step=2)
    assert monitor.alarms_active() == 1 == monitor.state()["signals"]["proto_user_k4"]["active"]
    assert monitor.observe_assignments("proto_user_k4", [365, 12, 11, 12], step=3) == []
    assert monitor.alarms_active() == 0


# -- assignments -----------------------------------------------------------------------------------------


def test_assignment_distribution_alarms_on_a_shift_and_rebaselines() -> None:
    monitor = DriftMonitor(DriftSettings())
    assert monitor.observe_assignments("proto_user_k4", [0, 0, 0, 0]) == []  # nothing clustered yet
    assert monitor.observe_assignments("proto_user_k4", [100, 100, 100, 100], step=100) == []  # reference
    assert monitor.observe_assignments("proto_user_k4", np.array([110, 95, 100, 95]), step=200) == []
    alarms = monitor.observe_assignments("proto_user_k4", [370, 10, 10, 10], step=300)
    assert brief(alarms) == [("proto_user_k4", "psi", 300), ("proto_user_k4", "js", 300)]
    assert alarms[0].value == pytest.approx(psi([100] * 4, [370, 10, 10, 10], 0.5), abs=1e-12)
    assert monitor.observe_assignments("proto_user_k4", [360, 15, 10, 15], step=400) == []  # new reference
    assert monitor.observe_assignments("proto_user_k4", [1, 1, 1, 1, 1, 1], step=500) == []  # K changed
    alarms = monitor.observe_assignments("proto_user_k4", [1, 1, 1, 1, 1, 100])
    assert brief(alarms) == [("proto_user_k4", "psi", 6), ("proto_user_k4", "js", 6)]  # 6th non-empty histogram
    assert alarms[0].index_unit == "observation"
    with pytest.raises(ValueError, match=r"^counts must be >= 0, got min -3$"):
        monitor.observe_assignments("proto_user_k4", [1, -3])


# -- metrics, log, settings, checkpoints -----------------------------------------------------------------


def test_metrics_and_log_follow_each_alarm(tmp_path: Path) -> None:
    log_path = tmp_path / "drift" / "alarms.jsonl"
    monitor = DriftMonitor(DriftSettings(), log_path=log_path)
    name = "proto_test_metrics_k3"
    before = sample("sitn_drift_alarms_total", signal=name, detector="psi")
    monitor.observe_assignments(name, [10, 10, 10])
    monitor.observe_assignments(name, [28, 1, 1], step=7)
    assert sample("sitn_drift_alarms_total", signal=name, detector="psi") == before + 1
    assert sample("sitn_drift_alarm_active", signal=name) == 1.0
    assert sample("sitn_drift_score", signal=name) == pytest.approx(psi([10, 10, 10], [28, 1, 1], 0.5))
    assert sample("sitn_drift_detector_state", signal=name, detector="js") == pytest.approx(
        js_divergence([10, 10, 10], [28, 1, 1]))
    monitor.observe_assignments(name, [28, 1, 1], step=8)  # a clean check clears the alarm
    assert sample("sitn_drift_alarm_active", signal=name) == 0.0
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    assert [(x["signal"], x["detector"], x["index"], x["index_unit"]) for x in lines] == [
        (name, "psi", 7, "step"), (name, "js", 7, "step"),
    ]
    assert set(lines[0]) == {"signal", "detector", "index", "index_unit", "value", "threshold", "wall_time_s"}
    DriftMonitor(DriftSettings(log_path=log_path)).observe_assignments(name, [1, 1, 1])
    monitor.observe_assignments(name, [10, 10, 10])  # spread out again
    assert len(log_path.read_bytes().splitlines()) == 4  # appended, never truncated


def test_assignment_relabelling_alarms_only_when_matched() -> None:
    """Sorted (the default) sees the shape of the size histogram; matched sees which prototype grew."""
    sorted_monitor = DriftMonitor(DriftSettings())
    matched = DriftMonitor(DriftSettings(assignment_compare="matched"))
    for monitor in (sorted_monitor, matched):
        monitor.observe_assignments("p_k3", [28, 1, 1], step=1)
    assert sorted_monitor.observe_assignments("p_k3", [1, 1, 28], step=2) == []  # a relabelling
    assert [a.detector for a in matched.observe_assignments("p_k3", [1, 1, 28], step=2)] == ["psi", "js"]
    assert [a.detector for a in sorted_monitor.observe_assignments("p_k3", [10, 10, 10], step=3)] == ["psi", "js"]


def test_step_gauges_show_detector_state() -> None:
    monitor = DriftMonitor(DriftSettings(burn_in_steps=0))
    for step in range(150):
        monitor.observe_step({"loss_i2i": 1.0 + 0.01 * (step % 2)}, step)
    # ADWIN's window: the 50 values after the 100-value warm-up that fixed the scale.
    assert sample("sitn_drift_detector_state", signal="loss_i2i", detector="adwin") == 50.0
    assert sample("sitn_drift_score", signal="loss_i2i") == monitor.state()["signals"]["loss_i2i"]["page_hinkley"]


def test_settings_come_from_the_environment_and_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SITN_DRIFT_PSI_THRESHOLD", "0.3")
    monkeypatch.setenv("SITN_DRIFT_CURRENT_WINDOW_EVENTS", "2500")
    settings = DriftSettings()
    assert (settings.psi_threshold, settings.current_window_events) == (0.3, 2500)
    assert DriftSettings(psi_threshold=0.25).psi_threshold == 0.25  # arguments win
    with pytest.raises(ValidationError, match="js_threshold"):
        DriftSettings(js_threshold=2.0)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DriftSettings(psi_treshold=0.1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="frozen"):
        settings.psi_threshold = 0.1  # type: ignore[misc]


def test_state_dict_resumes_exactly() -> None:
    settings = DriftSettings(reference_window_events=5_000, current_window_events=2_000, burn_in_steps=0)
    config = SyntheticConfig(events=60_000, seed=3, drift="popularity", drift_at_event=30_000)
    chunks = list(SyntheticStream(config.replace(chunk_events=10_000)).chunks())
    loss = step_series(0, 300, 600, level=3.0, std=0.1, shift=0.2)

    def run(monitor: DriftMonitor, part: slice) -> list[tuple[str, str, int]]:
        out = []
        for chunk, x, step in zip(chunks[part], loss[part.start * 100 :], range(part.start * 100, 600), strict=False):
            out += monitor.observe_events(chunk.domain_names(), chunk.item_ids())
            for k in range(100):
                out += monitor.observe_step({"loss": loss[step + k] if step + k < 600 else x}, step + k)
        return brief(out)

    straight = DriftMonitor(settings)
    expected = run(straight, slice(0, 3)) + run(straight, slice(3, 6))
    first = DriftMonitor(settings)
    got = run(first, slice(0, 3))
    resumed = DriftMonitor(settings)
    assert resumed.load_state_dict(first.state_dict()) is True
    got += run(resumed, slice(3, 6))
    assert got == expected
    assert {s for s, _, _ in expected} >= {"loss", "input_items_movie", "input_items_book"}
    assert resumed.state() == straight.state()
    # Other detector settings: the old state does not fit, the detectors restart.
    other = DriftMonitor(replace_settings(settings, adwin_delta=0.01))
    assert other.load_state_dict(first.state_dict()) is False
    assert other.state()["signals"] == {} and other.events_seen == 0
    with pytest.raises(ValueError, match=r"^drift state version 99 is not supported; expected 1$"):
        other.load_state_dict({**first.state_dict(), "version": 99})


def replace_settings(settings: DriftSettings, **changes: float) -> DriftSettings:
    return DriftSettings(**{**settings.model_dump(), **changes})


def test_alarm_is_a_plain_record() -> None:
    alarm = DriftAlarm("loss", "adwin", 3, "step", 1.5, 0.002, 10.0)
    assert alarm.to_dict() == {"signal": "loss", "detector": "adwin", "index": 3, "index_unit": "step",
                               "value": 1.5, "threshold": 0.002, "wall_time_s": 10.0}
    assert replace(alarm, index=4).index == 4


def test_a_loss_switching_on_after_a_constant_run_is_not_drift() -> None:
    """loss_i2c is 0 until its warm-up ends; that switch-on must not be read as a shift of the zeros."""
    rng = np.random.default_rng(5)
    monitor = DriftMonitor(DriftSettings(min_observations=50, burn_in_steps=0))
    alarms = []
    for step in range(1, 401):
        value = 0.0 if step <= 200 else 1.5 + 0.05 * float(rng.standard_normal())
        alarms += monitor.observe_step({"loss_i2c": value}, step)
    assert alarms == []
    assert monitor.state()["signals"]["loss_i2c"]["values"] == 400


def test_the_learning_curve_of_a_fresh_model_is_not_watched() -> None:
    """A loss falling steeply over the first steps is learning, not drift: nothing is fed before burn_in_steps."""
    monitor = DriftMonitor(DriftSettings(burn_in_steps=300, min_observations=20))
    alarms = [a for step in range(1, 301) for a in monitor.observe_step({"loss": 10.0 * 0.99**step}, step)]
    assert alarms == [] and monitor.state()["signals"] == {}
    monitor.observe_step({"loss": 0.5}, 301)
    assert monitor.state()["signals"]["loss"]["values"] == 1


def test_detectors_pickled_before_the_learner_regrouping_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint written before issue 10 holds the detectors pickled as ``learner.drift._StepSignal`` etc.;
    they load as ``learner.online.drift``'s classes (``learner.core.checkpoint.unpickle``) and resume alike."""
    from learner.online import drift

    def fed() -> DriftMonitor:
        monitor = DriftMonitor(DriftSettings(burn_in_steps=0))
        for step in range(150):
            monitor.observe_step({"loss": 1.0 + 0.01 * (step % 2)}, step)
        monitor.observe_events(["movie", "book"] * 100, [f"i{k % 7}" for k in range(200)])
        monitor.observe_assignments("proto_user_k4", [100, 100, 100, 100], step=100)
        return monitor

    classes = (drift._StepSignal, drift._WindowSignal, drift._AssignmentSignal)
    with monkeypatch.context() as old_paths:  # pickled as the code before the move named them
        old_paths.setitem(sys.modules, "learner.drift", drift)
        for cls in classes:
            old_paths.setattr(cls, "__module__", "learner.drift")
        old_state = fed().state_dict()
    assert b"learner.drift" in old_state["detectors"] and b"learner.online" not in old_state["detectors"]
    assert "learner.drift" not in sys.modules
    resumed, expected = DriftMonitor(DriftSettings(burn_in_steps=0)), fed()
    assert resumed.load_state_dict(old_state) is True
    assert {type(s) for s in (*resumed._steps.values(), *resumed._windows.values(), *resumed._assignments.values())} \
        == set(classes)
    assert resumed.state() == expected.state()
    assert brief(resumed.observe_assignments("proto_user_k4", [370, 10, 10, 10], step=300)) == brief(
        expected.observe_assignments("proto_user_k4", [370, 10, 10, 10], step=300)) == [
        ("proto_user_k4", "psi", 300), ("proto_user_k4", "js", 300)]
