"""Entropy controller: schedules, switching rule, dead band, serialisation, positive selection, and the
multi-step behaviour on a tabular policy (tools/entropy_control_demo.py)."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from aepo_jax.entropy_control import (
    ControllerConfig,
    EntropyController,
    TargetSchedule,
    select_positives,
)


def test_schedules():
    assert TargetSchedule.parse("0.5")(123) == 0.5
    assert TargetSchedule.parse(0.75)(0) == 0.75
    lin = TargetSchedule.parse("linear:1.0:0.2:100:500")
    assert lin(0) == 1.0 and lin(100) == 1.0 and lin(500) == pytest.approx(0.2) and lin(10_000) == pytest.approx(0.2)
    assert lin(300) == pytest.approx(0.6)
    cos = TargetSchedule.parse("cosine:1.0:0.2:0:400")
    assert cos(0) == 1.0 and cos(200) == pytest.approx(0.6) and cos(400) == pytest.approx(0.2)
    assert cos(100) > lin(100 + 100) - 1e-9  # cosine starts slower than linear
    pw = TargetSchedule.parse("piecewise:0=0.75,100=0.5,300=0.25")
    assert [pw(s) for s in (0, 99, 100, 299, 300, 10_000)] == [0.75, 0.75, 0.5, 0.5, 0.25, 0.25]
    pw2 = TargetSchedule.parse("piecewise:50=1.0,60=0.3")
    assert pw2(0) == 1.0 and pw2(60) == 0.3
    for s in (lin, cos, pw, TargetSchedule.parse("0.5")):
        d = json.loads(json.dumps(s.to_dict()))
        assert TargetSchedule.from_dict(d) == s
        assert TargetSchedule.parse(d) == s


@pytest.mark.parametrize(
    "spec, match",
    [("linear:1:0:5:5", "end_step"), ("piecewise:10=1,5=2", "increasing"), ("expo:1", "unknown"),
     ("linear:1:0", "cannot parse"), ("abc", "cannot parse")],
)
def test_schedule_bad_input(spec, match):
    with pytest.raises(ValueError, match=match):
        TargetSchedule.parse(spec)


def test_hard_switch_and_budgets():
    ctl = EntropyController(ControllerConfig(target=TargetSchedule.parse("0.5")))
    d = ctl.decide(0)  # nothing observed: raise first (the authors start from entropy 0)
    assert (d.mode, d.temperature, d.budget, d.entropy) == ("raise", 1.2, 60, None)
    ctl.observe(entropy_full=0.3, entropy_sampled=0.9)
    d = ctl.decide(1)
    assert (d.mode, d.temperature, d.budget, d.target, d.entropy) == ("raise", 1.2, 60, 0.5, 0.3)
    ctl.observe(entropy_full=0.7)
    d = ctl.decide(2)
    assert (d.mode, d.temperature, d.budget) == ("lower", 0.8, 30)
    ctl.observe(entropy_full=0.5)  # at the target: 1[H < target] = 0 -> lower
    assert ctl.decide(3).mode == "lower"


def test_estimator_choice_and_initial_entropy():
    cfg = ControllerConfig(target=TargetSchedule.parse("0.5"), estimator="sampled", initial_entropy=0.9)
    ctl = EntropyController(cfg)
    assert ctl.decide(0).mode == "lower"  # from initial_entropy
    ctl.observe(entropy_full=0.9, entropy_sampled=0.2)
    d = ctl.decide(1)
    assert d.mode == "raise" and d.entropy == 0.2
    ctl2 = EntropyController(ControllerConfig(estimator="sampled"))
    ctl2.observe(entropy_full=0.1)
    with pytest.raises(ValueError, match="entropy_sampled"):
        ctl2.decide(0)
    with pytest.raises(ValueError, match="finite"):
        ctl2.observe(entropy_full=math.nan)


def test_schedule_drives_decision():
    ctl = EntropyController(ControllerConfig(target=TargetSchedule.parse("piecewise:0=1.0,10=0.2")))
    ctl.observe(entropy_full=0.5)
    assert ctl.decide(5).mode == "raise"
    assert ctl.decide(10).mode == "lower"


def test_dead_band_hold_and_idle():
    hold = EntropyController(ControllerConfig(target=TargetSchedule.parse("0.5"), dead_band=0.1))
    seq = [(0.30, "raise"), (0.45, "raise"), (0.55, "raise"), (0.61, "lower"), (0.55, "lower"), (0.45, "lower"),
           (0.39, "raise")]
    for step, (h, want) in enumerate(seq):
        hold.observe(entropy_full=h)
        assert hold.decide(step).mode == want, (step, h)
    fresh = EntropyController(ControllerConfig(target=TargetSchedule.parse("0.5"), dead_band=0.1))
    fresh.observe(entropy_full=0.55)
    assert fresh.decide(0).mode == "lower"  # no previous direction: hard switch
    idle = EntropyController(ControllerConfig(target=TargetSchedule.parse("0.5"), dead_band=0.1, band_mode="idle"))
    idle.observe(entropy_full=0.52)
    d = idle.decide(0)
    assert (d.mode, d.temperature, d.budget) == ("idle", 1.0, 0)
    idle.observe(entropy_full=0.35)
    assert idle.decide(1).mode == "raise"


def test_serialisation_round_trip_continues_identically():
    cfg = ControllerConfig(target=TargetSchedule.parse("cosine:1.0:0.3:0:50"), dead_band=0.05, estimator="full",
                           budget_raise=7, budget_lower=3)
    rng = np.random.default_rng(0)
    hs = rng.uniform(0.2, 1.1, size=40)
    a = EntropyController(cfg)
    for i in range(20):
        a.observe(entropy_full=hs[i], entropy_sampled=hs[i] + 0.1)
        a.decide(i)
    blob = json.dumps(a.to_dict())
    b = EntropyController.from_dict(json.loads(blob))
    assert b.config == a.config
    for i in range(20, 40):
        for c in (a, b):
            c.observe(entropy_full=hs[i])
        assert a.decide(i) == b.decide(i)
    with pytest.raises(ValueError, match="config"):
        EntropyController.from_dict({"state": {}})


def test_config_validation():
    with pytest.raises(ValueError, match="estimator"):
        ControllerConfig(estimator="nll")
    with pytest.raises(ValueError, match="t_high"):
        ControllerConfig(t_high=0.7, t_low=0.8)
    with pytest.raises(ValueError, match="dead_band"):
        ControllerConfig(dead_band=-1)
    assert ControllerConfig(target="linear:1:0.5:0:10").target.kind == "linear"


def test_select_positives():
    r = np.array([0, 1, 1, 0, 1, 1, 1, 1, 0, 0], float)
    np.testing.assert_array_equal(select_positives(r, 3), [1, 2, 4])
    np.testing.assert_array_equal(select_positives(r, 100), [1, 2, 4, 5, 6, 7])
    assert select_positives(np.zeros(5), 60).size == 0  # no positives: empty, never an error
    assert select_positives(r, 0).size == 0
    sub = select_positives(r, 3, rng=np.random.default_rng(0))
    assert len(sub) == 3 and set(sub) <= {1, 2, 4, 5, 6, 7} and list(sub) == sorted(sub)
    # authors' rule: positive group advantage; the all-correct group (ids 2) is dropped
    g = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    r2 = np.array([0, 1, 1, 0, 1, 1, 1, 1, 0, 0], float)
    np.testing.assert_array_equal(select_positives(r2, 60, rule="group_adv", group_ids=g), [1, 2, 4])
    with pytest.raises(ValueError, match="group_ids"):
        select_positives(r2, 5, rule="group_adv")


def _demo():
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "entropy_control_demo.py")
    spec = importlib.util.spec_from_file_location("entropy_control_demo", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_controller_holds_three_targets_on_tabular_policy():
    demo = _demo()
    grpo = demo.simulate(None, steps=400)
    assert grpo[-1]["entropy_all_prompts"] < 0.65  # GRPO alone collapses below two of the targets
    for target in (0.4, 0.8, 1.2):
        rows = demo.simulate(target, steps=400)
        assert demo.tracking_error(rows) < 0.1, target
        assert rows[-1]["accuracy"] > 0.9  # control does not cost the task
    # with the sampled estimator it still tracks
    rows = demo.simulate(0.8, steps=400, estimator="sampled")
    assert demo.tracking_error(rows) < 0.12
    # and a target above GRPO's level needs the temperature term: without it (alpha = 0) it is missed
    rows = demo.simulate(1.2, steps=400, alpha=0.0)
    assert demo.tracking_error(rows) > 0.3


def test_demo_cli_writes_png(tmp_path):
    demo = _demo()
    out = tmp_path / "e.png"
    demo.main(["--steps", "60", "--targets", "0.5", "linear:1.0:0.5:0:60", "--out", str(out)])
    assert out.stat().st_size > 1000


def test_relative_target_is_a_multiple_of_the_first_observation():
    """target_relative: the schedule's values scale H0, the first value of the configured
    estimator; H0 survives a checkpoint round trip and later observations do not move it."""
    cfg = ControllerConfig(target=TargetSchedule.parse("piecewise:0=0.5,10=1.5"), target_relative=True,
                           estimator="sampled")
    ctl = EntropyController(cfg)
    assert ctl.decide(0).mode == "raise"  # no H0 yet: raise first, as without a measurement
    ctl.observe(entropy_full=0.9, entropy_sampled=0.4)
    d = ctl.decide(1)
    assert d.target == pytest.approx(0.2) and d.mode == "lower"
    ctl.observe(entropy_sampled=0.1)
    d = ctl.decide(2)
    assert d.target == pytest.approx(0.2) and d.mode == "raise"
    again = EntropyController.from_dict(json.loads(json.dumps(ctl.to_dict())))
    assert again.state.initial_signal == 0.4
    again.observe(entropy_sampled=0.5)
    d = again.decide(10)
    assert d.target == pytest.approx(0.6) and d.mode == "raise"
    # Absolute targets (the paper) ignore H0.
    plain = EntropyController(ControllerConfig(target=TargetSchedule.parse("0.5")))
    plain.observe(entropy_full=0.4)
    assert plain.decide(0).target == 0.5 and plain.state.initial_signal == 0.4


def _drifting_plant(cfg: ControllerConfig, drift: float, steps: int = 150, h0: float = 0.4) -> list[float]:
    """Entropy under the controller when the rest of the update drifts it by ``drift`` per step and
    the kept positives move it by up to 0.02 (raising, full budget) or 0.01 (lowering, full
    budget) per step, one step late (the decision acts on the next measurement)."""
    ctl, h, hs = EntropyController(cfg), h0, []
    for step in range(steps):
        ctl.observe(entropy_full=h)
        d = ctl.decide(step)
        push = 0.02 * d.budget / cfg.budget_raise if d.mode == "raise" else -0.01 * d.budget / cfg.budget_lower
        h = h + drift + push
        hs.append(h)
    return hs


@pytest.mark.parametrize("drift", [0.004, 0.008, -0.004])
def test_pi_removes_the_offset_a_drift_leaves(drift):
    """budget_mode=pi: against a constant drift (GRPO pulling towards its own entropy) the integral
    finds the push that cancels it, so the entropy settles on the target; proportional alone settles
    where its push equals the drift, off the target; fixed cycles around it with full-size steps."""
    target = TargetSchedule.parse("0.2")
    pi = _drifting_plant(ControllerConfig(target=target, budget_mode="pi"), drift, steps=400)[-50:]
    # the same band without the integral (pi's default width, 0.3)
    prop = _drifting_plant(ControllerConfig(target=target, budget_mode="proportional", proportional_width=0.3),
                           drift, steps=400)[-50:]
    fixed = _drifting_plant(ControllerConfig(target=target), drift, steps=400)[-50:]
    assert abs(np.mean(pi) - 0.2) < 0.001 and max(abs(h - 0.2) for h in pi[-20:]) < 0.001
    assert abs(np.mean(prop) - 0.2) > 0.01 * abs(drift) / 0.004
    assert max(abs(h - 0.2) for h in fixed) > 0.003


def test_pi_decisions_state_and_checks():
    assert ControllerConfig(budget_mode="pi").width == 0.3 and ControllerConfig(budget_mode="proportional").width == 0.1
    cfg = ControllerConfig(target=TargetSchedule.parse("0.5"), budget_mode="pi", proportional_width=0.1,
                           integral_gain=0.1)
    ctl = EntropyController(cfg)
    assert ctl.decide(0).mode == "raise"  # nothing observed yet
    ctl.observe(entropy_full=1.0)  # far above: full lowering, the integral stays frozen (no wind-up)
    d = ctl.decide(1)
    assert (d.mode, d.temperature, d.budget, ctl.state.integral) == ("lower", 0.8, 30, 0.0)
    ctl.observe(entropy_full=0.53)  # e = +0.06 inside the band: I = 0.06, u = (0.06 + 0.006) / 0.1 = 0.66
    d = ctl.decide(2)
    assert ctl.state.integral == pytest.approx(0.06) and (d.mode, d.budget) == ("lower", 20)
    assert ctl.decide(2).budget == d.budget and ctl.state.integral == pytest.approx(0.06)  # once per step
    ctl.observe(entropy_full=0.4995)  # just below the target, but the integral still says lower
    d = ctl.decide(3)
    assert d.mode == "lower" and d.temperature == 0.8 and d.budget >= 1
    ctl.observe(entropy_full=0.47)  # e = -0.06: raise
    d = ctl.decide(4)
    assert d.mode == "raise" and d.temperature == 1.2 and 1 <= d.budget < 60
    back = EntropyController.from_dict(json.loads(json.dumps(ctl.to_dict())))
    assert back.state.integral == ctl.state.integral and back.config == ctl.config
    with pytest.raises(ValueError, match="dead_band"):
        ControllerConfig(budget_mode="pi", dead_band=0.05)
    with pytest.raises(ValueError, match="integral_gain"):
        ControllerConfig(integral_gain=-0.1)
    # the integral is clamped: |integral_gain * I| <= 1
    clamp = EntropyController(cfg)
    for step in range(500):
        clamp.observe(entropy_full=0.54)
        clamp.decide(step)
    assert clamp.state.integral == pytest.approx(10.0)


def test_proportional_budget_shrinks_near_the_target():
    """budget_mode=proportional: same temperature rule as the paper, budget scaled by the relative
    error (full at proportional_width), never 0 while acting; fixed (default) is the paper's."""
    cfg = ControllerConfig(target=TargetSchedule.parse("0.5"), budget_mode="proportional", proportional_width=0.1)
    ctl = EntropyController(cfg)
    assert ctl.decide(0).budget == 60  # nothing observed yet: the paper's first step
    for h, mode, temp, budget in [(0.49, "raise", 1.2, 12), (0.45, "raise", 1.2, 60), (0.10, "raise", 1.2, 60),
                                  (0.51, "lower", 0.8, 6), (0.525, "lower", 0.8, 15), (0.9, "lower", 0.8, 30),
                                  (0.4999999, "raise", 1.2, 1)]:
        ctl.observe(entropy_full=h)
        d = ctl.decide(1)
        assert (d.mode, d.temperature, d.budget) == (mode, temp, budget), h
    fixed = EntropyController(ControllerConfig(target=TargetSchedule.parse("0.5")))
    fixed.observe(entropy_full=0.49)
    assert fixed.decide(1).budget == 60
    with pytest.raises(ValueError, match="budget_mode"):
        ControllerConfig(budget_mode="bang_bang")
    with pytest.raises(ValueError, match="proportional_width"):
        ControllerConfig(proportional_width=0.0)



def _momentum_plant(cfg: ControllerConfig, drift: float, steps: int = 300, h0: float = 0.4,
                    beta: float = 0.9, noise: float = 0.03, seed: int = 0) -> list[float]:
    """Entropy under the controller when each step's push (up to +0.02 raising, -0.015 lowering at
    full budget) reaches the entropy through Adam's first moment (an exponential average, beta, of
    the pushes), GRPO's ``drift`` is added every step, and the controller reads the entropy with a
    relative noise (the real per-step reading's standard error is 2-7% of it)."""
    rng = np.random.default_rng(seed)
    ctl, h, m, hs = EntropyController(cfg), h0, 0.0, []
    for step in range(steps):
        ctl.observe(entropy_full=h * (1 + noise * rng.standard_normal()))
        d = ctl.decide(step)
        push = 0.02 * d.budget / cfg.budget_raise if d.mode == "raise" else -0.015 * d.budget / cfg.budget_lower
        m = beta * m + (1 - beta) * push
        h = h + drift + m
        hs.append(h)
    return hs


def test_pid_settles_on_the_target_through_a_lag_a_drift_and_noise():
    """budget_mode=pid: with each decision reaching the entropy through a momentum, GRPO's drift
    pulling away from the target and a noisy reading, pid settles on the target from above and from
    below (mean error well under 1%); the paper's controller keeps cycling around it with full-size
    steps, and without an integral (proportional) the drift leaves an offset."""
    for target, drift in (("0.2", 0.003), ("0.8", -0.004)):
        sched = TargetSchedule.parse(target)
        t = float(target)

        def mean_error(cfg):
            return float(np.mean([abs(h - t) / t for h in _momentum_plant(cfg, drift)[-100:]]))

        pid = mean_error(ControllerConfig(target=sched, budget_mode="pid"))
        fixed = mean_error(ControllerConfig(target=sched))
        prop = mean_error(ControllerConfig(target=sched, budget_mode="proportional", proportional_width=0.3))
        assert pid < 0.01 and pid < fixed / 2 and pid < prop / 4, (target, pid, fixed, prop)


def test_pid_lever_slope_and_conditional_integral():
    """Until the target is reached (the error, or the error extrapolated derivative_steps ahead
    along its slope, is on the other side), pid decides as the paper does: the full budget towards
    the target. Then the lever is (e + derivative_steps x slope + integral_gain x I) / width with
    e = (H - target) / H0 and the slope fitted over the last derivative_window errors: approaching
    fast, it turns round before the target. The integral sums e only once reached, on steps whose
    lever is not saturated and whose error is not shrinking: it grows while an offset stands."""
    cfg = ControllerConfig(target=TargetSchedule.parse("0.2"), budget_mode="pid", derivative_steps=2.0,
                           derivative_window=3, integral_gain=0.1, proportional_width=0.6)
    ctl = EntropyController(cfg)
    got = []
    for step, h in enumerate([0.4, 0.36, 0.33, 0.279, 0.243]):  # e = 0.5, 0.4, 0.325, 0.1975, 0.1075 (H0 = 0.4)
        ctl.observe(entropy_full=h)
        d = ctl.decide(step)
        got.append((d.mode, d.budget, ctl.state.reached))
        assert ctl.state.integral == 0.0
    # steps 0-2: not reached (at step 2 the slope -0.0875 puts the error 2 steps ahead at +0.15): the paper's
    # full lowering budget; step 3: slope -0.10125, ahead -0.005: reached, u < 0 -> raise 1;
    # step 4: slope -0.10875, ahead 0.1075 - 0.2175 = -0.11, u = -0.183 -> raise round(60 x 0.183) = 11
    assert got == [("lower", 30, False)] * 3 + [("raise", 1, True), ("raise", 11, True)]
    assert ctl.decide(4).budget == 11 and len(ctl.state.errors) == 3  # once per step
    for step in range(5, 9):  # a standing offset, 5% of H0 above the target: summed once the slope is flat
        ctl.observe(entropy_full=0.22)
        ctl.decide(step)
    assert ctl.state.integral == pytest.approx(0.05 * 2)  # steps 7 and 8: errors (.., 0.05, 0.05, 0.05)
    integral = ctl.state.integral
    ctl.observe(entropy_full=0.6)  # e = +1: saturated (u > 1), the integral does not move
    ctl.decide(9)
    assert ctl.state.integral == integral
    with pytest.raises(ValueError, match="derivative_window"):
        ControllerConfig(budget_mode="pid", derivative_window=2)
    with pytest.raises(ValueError, match="derivative_steps"):
        ControllerConfig(budget_mode="pid", derivative_steps=-1.0)
    with pytest.raises(ValueError, match="dead_band"):
        ControllerConfig(budget_mode="pid", dead_band=0.05)
    assert (ControllerConfig(budget_mode="pid").width, ControllerConfig(budget_mode="pid").gain) == (0.6, 0.1)
    assert ControllerConfig(budget_mode="pi").gain == 0.03


def test_pid_approaches_as_the_paper_does():
    """From H0 to a target far away, pid's decisions are the paper's (full budget, T by the sign of
    the error) until the extrapolated error reaches the target, from above and from below."""
    for target, hs in (("0.5", [0.4, 0.39, 0.37, 0.36, 0.34]), ("2.0", [0.4, 0.41, 0.43, 0.44, 0.46])):
        paper = EntropyController(ControllerConfig(target=TargetSchedule.parse(target), target_relative=True))
        pid = EntropyController(ControllerConfig(target=TargetSchedule.parse(target), target_relative=True,
                                                 budget_mode="pid"))
        for step, h in enumerate(hs):
            for c in (paper, pid):
                c.observe(entropy_full=h)
            assert pid.decide(step) == paper.decide(step), (target, h)
        assert not pid.state.reached and pid.state.integral == 0.0


def test_pid_state_round_trip():
    cfg = ControllerConfig(target=TargetSchedule.parse("0.3"), budget_mode="pid")
    ctl = EntropyController(cfg)
    for step, h in enumerate([0.5, 0.4, 0.29, 0.31]):
        ctl.observe(entropy_full=h)
        ctl.decide(step)
    back = EntropyController.from_dict(json.loads(json.dumps(ctl.to_dict())))
    assert back.state == ctl.state and len(back.state.errors) == 4 and back.state.reached
    back.observe(entropy_full=0.33)
    ctl.observe(entropy_full=0.33)
    assert back.decide(4) == ctl.decide(4)
    # a state saved before pid existed (no errors, start_side, reached) still loads
    old = ctl.to_dict()
    for k in ("errors", "start_side", "reached"):
        del old["state"][k]
    assert EntropyController.from_dict(old).state.errors == []
