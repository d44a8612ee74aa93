"""AEPO's entropy controller: pick the sampling temperature and positive-sample budget from entropy.

Paper (Section 4.2): ``T = T_low + (T_high - T_low) * 1[H(pi_old) < H_target]`` with T_high = 1.2,
T_low = 0.8; Table 4: 60 positive temperature samples per step when raising entropy, 30 when
lowering. Beyond the paper (which says AEPO can follow an arbitrary target): the target may be a
schedule over steps (:class:`TargetSchedule`: constant, linear, cosine, piecewise), and the hard
switch may be replaced by a dead band (off by default).

The controller is host-side Python (NumPy only, no jax); its whole state is a small dict
(:meth:`EntropyController.to_dict` / :meth:`EntropyController.from_dict`) that the trainer
checkpoints, so a resumed run continues with the same temperature (the authors' code restarts
from entropy 0, i.e. T_high, after a resume).

Use per training step, as the trainer does (``aepo_jax/train.py``)::

    # paper-exact (old log-probs recomputed): measure this step's policy first, then decide
    ctl.observe(entropy_full=h_full, entropy_sampled=h_nll)   # entropy of the T = 1 rollout
    d = ctl.decide(step)                   # Decision(temperature, budget, target, mode, ...)
    ... draw temperature samples at d.temperature, keep <= d.budget positives (select_positives) ...
    ... update ...
    # on-policy shortcut: decide from the last observation, observe the update's own forward pass
    # (``policy/entropy_full``, ``policy/entropy_nll``): the signal is one update behind
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "ControllerConfig",
    "ControllerState",
    "Decision",
    "EntropyController",
    "TargetSchedule",
    "select_positives",
]

SCHEDULE_KINDS = ("constant", "linear", "cosine", "piecewise")
ESTIMATORS = ("full", "sampled")
SIGNALS = ("entropy", "length")  # what the controller holds at its target (aepo_jax/trainer/targets.py)
BAND_MODES = ("hold", "idle")
BUDGET_MODES = ("fixed", "proportional", "pi", "pid")
# proportional_width / integral_gain when none is given: each mode's, as measured (docs/training.md)
DEFAULT_WIDTH = {"fixed": 0.1, "proportional": 0.1, "pi": 0.3, "pid": 0.6}
DEFAULT_GAIN = {"fixed": 0.03, "proportional": 0.03, "pi": 0.03, "pid": 0.1}


@dataclasses.dataclass(frozen=True)
class TargetSchedule:
    """Entropy target as a function of the training step.

    constant:  ``value``.
    linear:    ``start`` at ``begin_step`` -> ``end`` at ``end_step``, constant outside.
    cosine:    same end points, half-cosine in between.
    piecewise: ``points`` = ((step, value), ...) sorted by step; each value holds from its step
               until the next point (the first value also before its step).

    String form (for configs / command lines)::

        "0.5" | "constant:0.5" | "linear:1.0:0.25:0:500" | "cosine:1.0:0.25:0:500"
        | "piecewise:0=0.75,100=0.5,300=0.25"
    """

    kind: str = "constant"
    value: float = 0.5
    start: float = 0.0
    end: float = 0.0
    begin_step: int = 0
    end_step: int = 0
    points: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"TargetSchedule.kind: expected one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if self.kind in ("linear", "cosine") and not self.end_step > self.begin_step:
            raise ValueError(
                f"TargetSchedule: {self.kind} needs end_step > begin_step, got {self.begin_step}..{self.end_step}"
            )
        if self.kind == "piecewise":
            if not self.points:
                raise ValueError("TargetSchedule.points: piecewise needs at least one (step, value) point")
            steps = [int(s) for s, _ in self.points]
            if steps != sorted(steps) or len(set(steps)) != len(steps):
                raise ValueError(f"TargetSchedule.points: steps must be strictly increasing, got {steps}")
            object.__setattr__(self, "points", tuple((int(s), float(v)) for s, v in self.points))

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return float(self.value)
        if self.kind == "piecewise":
            value = self.points[0][1]
            for s, v in self.points:
                if step >= s:
                    value = v
            return float(value)
        frac = min(max((step - self.begin_step) / (self.end_step - self.begin_step), 0.0), 1.0)
        if self.kind == "cosine":
            frac = 0.5 * (1.0 - math.cos(math.pi * frac))
        return float(self.start + (self.end - self.start) * frac)

    @classmethod
    def parse(cls, spec: str | float | Mapping[str, Any]) -> "TargetSchedule":
        """Build from a number, a string (see class doc) or a dict (``to_dict`` output)."""
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if isinstance(spec, (int, float)):
            return cls(kind="constant", value=float(spec))
        s = str(spec).strip()
        try:
            if ":" not in s:
                return cls(kind="constant", value=float(s))
            kind, rest = s.split(":", 1)
            kind = kind.strip()
            if kind == "constant":
                return cls(kind="constant", value=float(rest))
            if kind in ("linear", "cosine"):
                a, b, c, d = rest.split(":")
                return cls(kind=kind, start=float(a), end=float(b), begin_step=int(c), end_step=int(d))
            if kind == "piecewise":
                pts = []
                for item in rest.split(","):
                    st, v = item.split("=")
                    pts.append((int(st), float(v)))
                return cls(kind="piecewise", points=tuple(pts))
        except ValueError as e:
            if "TargetSchedule" in str(e):
                raise
            raise ValueError(f"entropy target: cannot parse {spec!r} ({e}); see TargetSchedule's doc") from None
        raise ValueError(f"entropy target: unknown schedule kind in {spec!r}; expected one of {SCHEDULE_KINDS}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["points"] = [list(p) for p in self.points]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TargetSchedule":
        d = dict(d)
        d["points"] = tuple(tuple(p) for p in d.get("points", ()))
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """Controller settings (defaults: the paper's Table 4).

    signal: the statistic held at the target: ``entropy`` (the paper; nats/token, read with
      ``estimator``) or ``length`` (mean response tokens of the correct responses of the step's
      rollout). Its unit is the target's; the decision rule is the same for every signal.
    estimator: which observed entropy drives the switch: ``full`` (full-distribution entropy, the
      paper's H, Section 3.2) or ``sampled`` (-log pi(o_t), what the authors' code uses).
    dead_band: half-width of a band around the target; 0 = the paper's hard switch. Inside the band
      ``band_mode`` decides: ``hold`` keeps the previous direction (hysteresis), ``idle`` draws no
      temperature samples (budget 0, T = 1) until entropy leaves the band.
    initial_entropy: entropy assumed before the first observation; None = raise first (the
      authors' code starts from entropy 0, so its first step uses T_high).
    budget_mode: ``fixed`` (the paper): every step keeps up to budget_raise / budget_lower
      positives. ``proportional``: the budget shrinks with the distance to the target, ``budget *
      min(1, |H - target| / (proportional_width * target))`` (at least 1), so a step just below
      the target adds a few positives at T_high instead of the full 60. The temperature rule is
      the paper's. Why: with a fixed budget the controller acts at full strength on both sides of
      the target; the effect shows one step later, so small errors turn into overshoots (on the
      toy task at target 0.5 x H0, every miss of the +-10% band was an overshoot above it after a
      burst of full-budget raising steps).
    proportional_width: relative error at which the proportional budget reaches its maximum (and,
      for ``pi`` and ``pid``, the width of the proportional band; for ``pid`` in units of H0);
      None = 0.1 for ``proportional``, 0.3 for ``pi``, 0.6 for ``pid`` (:attr:`width`).
    budget_mode ``pi`` (not the paper): proportional-integral control of one signed lever.
      ``e = (H - target) / target``; inside the band (``|e| < proportional_width``) the integral
      ``I`` accumulates ``e`` (clamped to ``|integral_gain * I| <= 1``; frozen outside the band,
      so the descent from H0 does not wind it up); ``u = (e + integral_gain * I) /
      proportional_width``. ``u > 0`` lowers (T_low), ``u <= 0`` raises (T_high), with the
      direction's budget times ``min(1, |u|)`` (at least 1). Why: on the toy task GRPO alone drifts
      towards its own entropy level; a target on the other side of it needs a steady push against
      that drift. A fixed budget gives that push only as a limit cycle of full-strength steps
      (raising bursts of 60 positives overshoot, 30 lowering ones need many steps to undo them); a
      proportional budget alone settles where its push equals the drift, an offset of up to
      proportional_width from the target. The integral removes that offset (it learns the push
      the drift needs), the proportional part keeps steps near the target small.
    integral_gain: weight of the integral in ``pi`` and ``pid``; None = 0.03 for ``pi``, 0.1 for
      ``pid`` (:attr:`gain`). Both pi settings are small on purpose: one
      decision moves the entropy over several later steps (Adam's momentum carries each update's
      direction into the next ones) and the per-step entropy estimate is noisy (about 5% of H on
      the toy task), so a high gain turns lag and noise into oscillation. Measured at 0.5 x H0
      (docs/training.md): width 0.1 with gain 0.1 held it worse than the fixed budget on base
      seeds 0 and 1; width 0.3 with gain 0.03 better on seed 1, worse on seed 0, where the integral
      winds up during the approach from H0. Not yet a replacement for ``fixed``.
    budget_mode ``pid`` (not the paper): the paper's rule until the target is reached, then a PID
      controller of the budget. Reached: the error, or the error extrapolated ``derivative_steps``
      along its slope, is on the other side of the target from the first one (so the full push
      stops before the optimizer's momentum carries the entropy past the target). Then
      ``e = (H - target) / H0``
      (H0: the first observed value of the signal), ``u = (e + derivative_steps * slope +
      integral_gain * I) / proportional_width``, with ``slope`` the least-squares slope of ``e``
      per step over the last ``derivative_window`` decisions (0 until there are 3) and ``I`` the
      sum of ``e`` over the steps on which the lever was not saturated (``|u| < 1`` before adding
      that step's error) and the error was not closing (``e * slope >= 0``); clamped to
      ``|integral_gain * I| <= 1``; ``u > 0`` lowers (T_low), else
      raises (T_high), with the direction's budget times ``min(1, |u|)`` (at least 1). Why: Adam's first moment (beta1 = 0.9) keeps applying each
      step's REINFORCE gradient for about ten more steps, so the entropy behaves like an integrator
      behind a lag: a controller that reads only the error (fixed, proportional, pi) is still
      pushing when the entropy reaches the target and overshoots, in a cycle. The slope says where
      the entropy is heading (``e + derivative_steps * slope`` is the error that many steps ahead),
      so the push eases off before the target and leans against a drift before the error grows:
      the derivative term of classical control, the standard remedy for such a lag. The integral
      removes the offset that GRPO's own drift leaves; summing only while the lever is not
      saturated and the error is not already shrinking (conditional integration, the usual
      anti-windup) it does not grow on the way from H0, which would carry the entropy past the
      target afterwards (``pi``'s failure at 0.5 x H0). The error is in units of H0, not of the target, because
      the lever moves the entropy by about the same nats per step at any target (on the toy task
      at full budget about 0.02 nats a step both at 0.5 and at 2 x H0): relative to the target the
      same controller would have four times the loop gain at 0.5 x H0 as at 2 x H0, and oscillate
      at the one or crawl at the other.
    derivative_steps: how many steps ahead ``pid`` extrapolates the error (its derivative gain).
    derivative_window: decisions the ``pid`` slope is fitted over (>= 3): longer is less noisy and
      later.
    target_relative: False (the paper): the schedule's values are entropies in nats/token. True:
      they are multiples of H0, the first entropy the controller observes (the base model's), so
      ``target=0.5`` holds half the starting entropy whatever the model. H0 is part of the state
      (checkpointed); before the first observation there is no target and the controller raises.
    """

    target: TargetSchedule = TargetSchedule()
    t_high: float = 1.2
    t_low: float = 0.8
    budget_raise: int = 60
    budget_lower: int = 30
    estimator: str = "full"
    dead_band: float = 0.0
    band_mode: str = "hold"
    initial_entropy: float | None = None
    target_relative: bool = False
    budget_mode: str = "fixed"
    proportional_width: float | None = None
    integral_gain: float | None = None
    derivative_steps: float = 3.0
    derivative_window: int = 5
    signal: str = "entropy"

    def __post_init__(self):
        if not isinstance(self.target, TargetSchedule):
            object.__setattr__(self, "target", TargetSchedule.parse(self.target))
        if self.signal not in SIGNALS:
            raise ValueError(f"ControllerConfig.signal: expected one of {SIGNALS}, got {self.signal!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"ControllerConfig.estimator: expected one of {ESTIMATORS}, got {self.estimator!r}")
        if self.band_mode not in BAND_MODES:
            raise ValueError(f"ControllerConfig.band_mode: expected one of {BAND_MODES}, got {self.band_mode!r}")
        if not (self.t_low > 0 and self.t_high > 0):
            raise ValueError(f"ControllerConfig: temperatures must be > 0, got t_low={self.t_low}, t_high={self.t_high}")
        if not self.t_high >= self.t_low:
            raise ValueError(f"ControllerConfig: t_high ({self.t_high}) must be >= t_low ({self.t_low})")
        if self.budget_raise < 0 or self.budget_lower < 0:
            raise ValueError(
                f"ControllerConfig: budgets must be >= 0, got raise={self.budget_raise}, lower={self.budget_lower}"
            )
        if self.budget_mode not in BUDGET_MODES:
            raise ValueError(f"ControllerConfig.budget_mode: expected one of {BUDGET_MODES}, got {self.budget_mode!r}")
        if self.proportional_width is not None and not self.proportional_width > 0:
            raise ValueError(f"ControllerConfig.proportional_width: expected > 0 or None, got {self.proportional_width}")
        if not self.dead_band >= 0:
            raise ValueError(f"ControllerConfig.dead_band: expected >= 0, got {self.dead_band}")
        if self.integral_gain is not None and not self.integral_gain >= 0:
            raise ValueError(f"ControllerConfig.integral_gain: expected >= 0 or None, got {self.integral_gain}")
        if not self.derivative_steps >= 0:
            raise ValueError(f"ControllerConfig.derivative_steps: expected >= 0, got {self.derivative_steps}")
        if not self.derivative_window >= 3:
            raise ValueError(f"ControllerConfig.derivative_window: expected >= 3, got {self.derivative_window}")
        if self.budget_mode in ("pi", "pid") and self.dead_band > 0:
            raise ValueError(f"ControllerConfig: budget_mode={self.budget_mode!r} decides the direction from its own "
                             f"signal; dead_band must be 0 with it, got {self.dead_band}")

    @property
    def width(self) -> float:
        """The proportional band in use (``proportional_width``, or the mode's default)."""
        return self.proportional_width if self.proportional_width is not None else DEFAULT_WIDTH[self.budget_mode]

    @property
    def gain(self) -> float:
        """The integral gain in use (``integral_gain``, or the mode's default)."""
        return self.integral_gain if self.integral_gain is not None else DEFAULT_GAIN[self.budget_mode]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target"] = self.target.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ControllerConfig":
        d = dict(d)
        d["target"] = TargetSchedule.parse(d.get("target", TargetSchedule().to_dict()))
        return cls(**d)


@dataclasses.dataclass
class ControllerState:
    """Everything the controller remembers (checkpoint this)."""

    entropy_full: float | None = None
    entropy_sampled: float | None = None
    mode: str | None = None  # last decision: "raise" | "lower" | "idle"
    temperature: float | None = None
    budget: int | None = None
    target: float | None = None
    step: int | None = None  # step of the last decision
    num_observations: int = 0
    initial_signal: float | None = None  # H0: the first observed value of the configured estimator (or length)
    length: float | None = None  # the last observed mean length of correct responses (signal "length")
    integral: float = 0.0  # budget_mode=pi: the sum of relative errors inside the proportional band
    errors: list = dataclasses.field(default_factory=list)  # budget_mode=pid: the last derivative_window relative errors
    start_side: int | None = None  # budget_mode=pid: the sign of the first error (+1: above the target)
    reached: bool = False  # budget_mode=pid: the error (or its extrapolation) has crossed to the other side


@dataclasses.dataclass(frozen=True)
class Decision:
    step: int
    temperature: float
    budget: int
    target: float
    entropy: float | None  # the signal the decision used (None before any observation)
    mode: str  # "raise" | "lower" | "idle"


class EntropyController:
    """Temperature / budget controller with a serialisable state."""

    def __init__(self, config: ControllerConfig | None = None, state: ControllerState | None = None):
        self.config = config or ControllerConfig()
        self.state = state or ControllerState()

    # -- signal
    def observe(self, *, entropy_full: float | None = None, entropy_sampled: float | None = None,
                length: float | None = None) -> None:
        """Record the current policy's measured entropy (either or both estimators) and/or the
        mean length of its correct responses."""
        for name, v in (("entropy_full", entropy_full), ("entropy_sampled", entropy_sampled), ("length", length)):
            if v is not None and not math.isfinite(float(v)):
                raise ValueError(f"observe: {name} is not finite ({v})")
        if entropy_full is None and entropy_sampled is None and length is None:
            raise ValueError("observe: pass entropy_full, entropy_sampled and/or length")
        if length is not None:
            self.state.length = float(length)
            if self.config.signal == "length" and self.state.initial_signal is None:
                self.state.initial_signal = self.state.length
            if entropy_full is None and entropy_sampled is None:
                return  # a length alone is not an entropy observation
        if entropy_full is not None:
            self.state.entropy_full = float(entropy_full)
        if entropy_sampled is not None:
            self.state.entropy_sampled = float(entropy_sampled)
        self.state.num_observations += 1
        if self.state.initial_signal is None and self.config.signal == "entropy":
            first = self.state.entropy_full if self.config.estimator == "full" else self.state.entropy_sampled
            self.state.initial_signal = first

    def signal(self) -> float | None:
        if self.config.signal == "length":
            return self.state.length  # None until a step has a correct response: raise first
        s = self.state.entropy_full if self.config.estimator == "full" else self.state.entropy_sampled
        if s is None and self.state.num_observations > 0:
            raise ValueError(
                f"controller: estimator={self.config.estimator!r} but only the other estimator was observed; "
                f"pass entropy_{'full' if self.config.estimator == 'full' else 'sampled'} to observe()"
            )
        return s if s is not None else self.config.initial_entropy

    # -- decision
    def decide(self, step: int) -> Decision:
        """Temperature and budget for the temperature samples of ``step``."""
        cfg = self.config
        target = cfg.target(step)
        if cfg.target_relative:
            h0 = self.state.initial_signal
            target = float("nan") if h0 is None else target * h0
        h = self.signal()
        if h is None or math.isnan(target):
            mode = "raise"
        elif cfg.dead_band <= 0:
            mode = "raise" if h < target else "lower"
        elif h < target - cfg.dead_band:
            mode = "raise"
        elif h > target + cfg.dead_band:
            mode = "lower"
        elif cfg.band_mode == "idle":
            mode = "idle"
        else:  # hold: keep the previous direction; with none yet, use the hard switch
            prev = self.state.mode
            mode = prev if prev in ("raise", "lower") else ("raise" if h < target else "lower")
        if mode == "raise":
            temperature, budget = cfg.t_high, cfg.budget_raise
        elif mode == "lower":
            temperature, budget = cfg.t_low, cfg.budget_lower
        else:
            temperature, budget = 1.0, 0
        st = self.state
        if cfg.budget_mode == "proportional" and h is not None and mode != "idle" and target > 0:
            share = min(1.0, abs(h - target) / (cfg.width * target))
            budget = max(1, int(round(budget * share))) if budget > 0 else 0
        elif cfg.budget_mode in ("pi", "pid") and h is not None and not math.isnan(target) and target > 0:
            scale = st.initial_signal if cfg.budget_mode == "pid" and st.initial_signal else target
            e = (h - target) / scale
            limit = 1.0 / cfg.gain if cfg.gain > 0 else 0.0
            if st.step != int(step):  # the integral and the history move once per step, however often decide() runs
                if cfg.budget_mode == "pi":
                    if abs(e) < cfg.width:  # inside the band only
                        st.integral = float(min(limit, max(-limit, st.integral + e)))
                else:
                    st.errors = [*st.errors, float(e)][-cfg.derivative_window:]
                    slope = least_squares_slope(st.errors)
                    ahead = e + cfg.derivative_steps * slope
                    side = 1 if e > 0 else -1
                    if st.start_side is None:
                        st.start_side = side
                    # reached: the error, or the error extrapolated derivative_steps ahead, is on the
                    # other side of the target from where it started
                    st.reached = st.reached or side != st.start_side or ahead * st.start_side <= 0
                    # conditional integration: not while the lever is saturated, nor while the error
                    # is already closing on its own (the approach from H0): only a standing offset
                    if (st.reached and len(st.errors) >= 3 and abs(ahead + cfg.gain * st.integral) < cfg.width
                            and e * slope >= 0):
                        st.integral = float(min(limit, max(-limit, st.integral + e)))
            u = e + cfg.gain * st.integral
            if cfg.budget_mode == "pid":
                # until the target is reached, the paper's full push (the fastest approach)
                u = (u + cfg.derivative_steps * least_squares_slope(st.errors)) if st.reached else math.copysign(1e9, e)
            u /= cfg.width
            mode = "lower" if u > 0 else "raise"
            temperature, full = (cfg.t_low, cfg.budget_lower) if mode == "lower" else (cfg.t_high, cfg.budget_raise)
            budget = max(1, int(round(full * min(1.0, abs(u))))) if full > 0 else 0
        st.mode, st.temperature, st.budget, st.target, st.step = mode, temperature, budget, target, int(step)
        return Decision(int(step), float(temperature), int(budget), float(target), h, mode)

    # -- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "state": dataclasses.asdict(self.state)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EntropyController":
        if "config" not in d or "state" not in d:
            raise ValueError(f"EntropyController.from_dict: expected keys 'config' and 'state', got {sorted(d)}")
        return cls(ControllerConfig.from_dict(d["config"]), ControllerState(**d["state"]))


def least_squares_slope(ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` against 0, 1, 2, ... (0 for fewer than 3 points)."""
    n = len(ys)
    if n < 3:
        return 0.0
    xm = (n - 1) / 2
    ym = sum(ys) / n
    return sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sum((i - xm) ** 2 for i in range(n))


def select_positives(
    rewards: Sequence[float] | np.ndarray,
    budget: int,
    *,
    rule: str = "reward",
    group_ids: Sequence[int] | np.ndarray | None = None,
    threshold: float = 0.05,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Indices of at most ``budget`` positive temperature samples (possibly none: never raises for 0).

    rule ``reward`` (paper): R > 0. Rule ``group_adv`` (authors' code): GRPO advantage within the
    sample's temperature group > ``threshold``; with binary rewards this drops groups in which
    every sample is correct. Kept in batch order (the authors take the first k) unless ``rng`` is
    given, then a random subset.
    """
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards: expected a 1-D array, got shape {r.shape}")
    if budget < 0:
        raise ValueError(f"budget: expected >= 0, got {budget}")
    if rule == "reward":
        ok = r > 0
    elif rule == "group_adv":
        if group_ids is None:
            raise ValueError("group_ids: required for rule='group_adv'")
        g = np.asarray(group_ids)
        if g.shape != r.shape:
            raise ValueError(f"group_ids: expected shape {r.shape}, got {g.shape}")
        adv = np.zeros_like(r)
        for gid in np.unique(g):
            sel = g == gid
            x = r[sel]
            if x.size > 1 and not np.all(x == x[0]):
                adv[sel] = (x - x.mean()) / (x.std(ddof=1) + 1e-6)
        ok = adv > threshold
    else:
        raise ValueError(f"rule: expected 'reward' or 'group_adv', got {rule!r}")
    idx = np.flatnonzero(ok)
    if rng is not None:
        idx = np.sort(rng.permutation(idx)[:budget])
    return idx[:budget]
