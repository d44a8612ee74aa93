"""The reproduction study's report: tables, claims with verdicts, figures (``tools/reproduce.py``).

``write(data, out)`` reads only ``data`` (what ``OUT/runs.json`` holds: every run's spec, per-step
series and held-out evaluation, the base models' evaluations and the Appendix B checks) and
writes ``out/README.md`` and the PNG figures next to it, so the report can be redrawn from the
stored rows (``python tools/reproduce.py --report-only``).

Definitions used by every verdict (stated in the README as well):
* H0: the run's entropy at step 1 (its base model's, by the controller's estimator);
* held: at least 90% of the second half of the steps within +-10% of the target;
* collapse: entropy at the end (mean of the last 10% of steps) <= 0.8 x H0; explosion: >= 1.5 x H0.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from reproduce import BAND, LENGTH_HELD_SHARE, PARALLEL_EFFICIENCY, summarize_length, summarize_run

HELD_SHARE = 0.9
COLLAPSE = 0.8
EXPLOSION = 1.5
FIGURES = {
    "fig1": "fig1_entropy_targets.png",
    "fig4": "fig4_baselines.png",
    "passk": "fig_passk.png",
    "perf": "fig_entropy_vs_performance.png",
    "robust": "fig_robustness.png",
    "length": "fig_length_target.png",
    "theory": "fig_appendix_b.png",
}


def _mean(xs) -> float:
    xs = [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _sd(xs) -> float:
    xs = [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _f(x, nd: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _pm(xs, fmt=_f) -> str:
    """mean (+- sd over seeds when there are several)."""
    m, s = _mean(xs), _sd(xs)
    return fmt(m) if math.isnan(s) else f"{fmt(m)} +- {fmt(s)}"


class Study:
    """The runs of one study, grouped the way the report reads them."""

    def __init__(self, data: dict):
        self.data = data
        self.runs = [r for r in data.get("runs", []) if r.get("complete")]
        self.sum = {r["name"]: summarize_run(r) for r in self.runs}
        self.by_name = {r["name"]: r for r in self.runs}
        self.bases = {b["name"]: b for b in data.get("bases", [])}

    def select(self, group: str | None = None, method: str | None = None, reading: str | None = None,
               target=..., base: str | None = None, options=...) -> list[dict]:
        out = []
        for r in self.runs:
            spec = r["run"]
            if group and spec["group"] != group or method and spec["method"] != method:
                continue
            if reading and spec["reading"] != reading or base and spec["base"] != base:
                continue
            if target is not ... and spec["target"] != target:
                continue
            if options is not ... and [list(o) for o in spec["options"]] != [list(o) for o in options]:
                continue
            out.append(r)
        return out

    def s(self, runs: Sequence[dict], key: str) -> list:
        return [self.sum[r["name"]][key] for r in runs]

    def ratio(self, runs: Sequence[dict]) -> list[float]:
        return [self.sum[r["name"]]["h_end"] / self.sum[r["name"]]["h0"] for r in runs]

    def targets(self) -> list[float]:
        return sorted({r["run"]["target"] for r in self.select("held")})

    def readings(self) -> list[str]:
        return [x for x in ("paper", "mix") if self.select("held", reading=x)]

    def base_names(self, group: str) -> list[str]:
        return sorted({r["run"]["base"] for r in self.select(group)})


# --- figures -------------------------------------------------------------------------------------------


def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _finish_one_axes(fig, ax, path, xlabel: str, ylabel: str, title: str) -> None:
    """The single-axes figures' common ending: labels, grid, legend, written and closed."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    _plt().close(fig)


def _target_colours(plt):
    """Colour of the j-th of n targets (called as cmap(j / (n - 1))): blue (lowest) through green to red."""
    colours = ["#1f3b99", "#2e86c1", "#1e8449", "#d68910", "#c0392b"]
    return lambda x: colours[min(len(colours) - 1, round(x * (len(colours) - 1)))]


def _curve(runs: Sequence[dict], key: str = "entropy", norm: bool = False) -> tuple[list[int], list[float]]:
    """Mean over runs (seeds) of a per-step series (divided by each run's H0 when norm)."""
    if not runs:
        return [], []
    n = min(len(r["steps"]) for r in runs)
    ys = []
    for i in range(n):
        vals = []
        for r in runs:
            v = r["series"][key][i]
            h0 = r["series"]["entropy"][0]
            if isinstance(v, (int, float)):
                vals.append(v / h0 if norm and h0 else v)
        ys.append(_mean(vals))
    return runs[0]["steps"][:n], ys


def fig_targets(st: Study, path: Path) -> None:
    plt = _plt()
    readings = st.readings()
    fig, axes = plt.subplots(1, len(readings), figsize=(6.2 * len(readings), 4.4), sharey=True, squeeze=False,
                             constrained_layout=True)
    cmap = _target_colours(plt)
    targets = st.targets()
    for ax, reading in zip(axes[0], readings):
        for j, t in enumerate(targets):
            c = cmap(j / max(1, len(targets) - 1))
            runs = st.select("held", method="aepo", reading=reading, target=t)
            for r in runs:
                ax.plot(r["steps"], r["series"]["entropy"], color=c, alpha=0.25, linewidth=0.8)
            x, y = _curve(runs)
            ax.plot(x, y, color=c, linewidth=2, label=f"target {t:g} x H0")
            x, yt = _curve(runs, "entropy_target")
            ax.plot(x, yt, "--", color=c, linewidth=1)
            ax.fill_between(x, [v * (1 - BAND) for v in yt], [v * (1 + BAND) for v in yt], color=c, alpha=0.08)
        grpo = st.select("baseline", method="grpo")
        if grpo:
            x, y = _curve(grpo)
            ax.plot(x, y, color="black", linewidth=1.5, linestyle=":", label="GRPO")
        ax.set_title(f"AEPO, reading '{reading}'")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("policy entropy (nats/token)")
    axes[0][-1].legend(fontsize="small", loc="upper left")
    fig.suptitle("Fig. 1 reproduced: entropy per target (dashed: target, band: +-10%)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _baseline_sets(st: Study) -> list[tuple[str, list[dict]]]:
    out = [("GRPO", st.select("baseline", method="grpo"))]
    for coef in sorted({dict(map(tuple, r["run"]["options"])).get("algorithm.entropy_coef") for r in st.select("baseline", method="entropy_reg")},
                       key=lambda c: float(c)):
        out.append((f"Entropy-Reg lambda={coef}", st.select("baseline", method="entropy_reg", options=[["algorithm.entropy_coef", coef]])))
    out.append(("Entropy-Adv", st.select("baseline", method="entropy_adv")))
    out.append(("Clip-Cov", st.select("baseline", method="clip_cov")))
    out.append(("KL-Cov", st.select("baseline", method="kl_cov")))
    abl = st.select("baseline", method="ablation_eq2")
    t = abl[0]["run"]["target"] if abl else None
    out.append((f"Eq. (2) ablation, target {t:g} x H0" if t else "Eq. (2) ablation", abl))
    out.append((f"Eq. (3) ablation, target {t:g} x H0" if t else "Eq. (3) ablation", st.select("baseline", method="ablation_eq3")))
    if t is not None:
        out.append((f"AEPO (paper), target {t:g} x H0", st.select("held", method="aepo", reading="paper", target=t)))
    return [(k, v) for k, v in out if v]


def fig_baselines(st: Study, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.8), constrained_layout=True)
    for label, runs in _baseline_sets(st):
        x, y = _curve(runs, norm=True)
        ax.plot(x, y, linewidth=2 if label.startswith("AEPO") else 1.5, label=label,
                linestyle="-" if not label.startswith("Eq") else "--")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.axhline(COLLAPSE, color="gray", linewidth=0.8, linestyle=":")
    ax.axhline(EXPLOSION, color="gray", linewidth=0.8, linestyle=":")
    _finish_one_axes(fig, ax, path, "step", "entropy / H0 (mean over seeds)",
                     "Fig. 4 reproduced: entropy of AEPO and the baselines (dotted: 0.8 and 1.5 x H0)")


def _passk_rows(st: Study) -> list[tuple[str, list[dict], str]]:
    """(label, evaluations (one per seed), kind) for the performance tables and figure."""
    rows = []
    seeds = sorted({r["run"]["base"] for r in st.select("held")})
    base_evals = [st.bases[b]["eval"] for b in seeds if b in st.bases]
    if base_evals:
        rows.append(("base model", base_evals, "base"))
    rows.append(("GRPO", [r["eval"] for r in st.select("baseline", method="grpo")], "grpo"))
    for method, label in (("clip_cov", "Clip-Cov"), ("kl_cov", "KL-Cov")):  # the covariance baselines
        rows.append((label, [r["eval"] for r in st.select("baseline", method=method)], "cov"))
    for reading in st.readings():
        for t in st.targets():
            rows.append((f"AEPO ({reading}) {t:g} x H0", [r["eval"] for r in st.select("held", reading=reading, target=t)], reading))
    return [r for r in rows if r[1]]


def _ks(evals: Sequence[dict]) -> list[int]:
    return sorted({int(k) for e in evals for k in e["pass_at_k"]})


def _passk(evals: Sequence[dict], k: int) -> float:
    return _mean([e["pass_at_k"].get(str(k), e["pass_at_k"].get(k)) for e in evals])


def fig_passk(st: Study, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), constrained_layout=True)
    cmap = _target_colours(plt)
    targets = st.targets()
    for label, evals, kind in _passk_rows(st):
        if kind == "mix":
            continue
        ks = _ks(evals)
        ys = [_passk(evals, k) for k in ks]
        if kind == "base":
            ax.plot(ks, ys, color="gray", linewidth=2, label=label)
        elif kind == "grpo":
            ax.plot(ks, ys, color="black", linestyle=":", linewidth=2, label=label)
        elif kind == "cov":
            ax.plot(ks, ys, linestyle="--", linewidth=1.5, label=label)
        else:
            t = float(label.split(")")[1].split("x")[0])
            ax.plot(ks, ys, color=cmap(targets.index(t) / max(1, len(targets) - 1)), label=label)
    ax.set_xscale("log", base=2)
    _finish_one_axes(fig, ax, path, "k", "pass@k on the held-out split",
                     "pass@k at the end of training (AEPO reading 'paper'; mean over seeds)")


def fig_entropy_perf(st: Study, path: Path) -> None:
    plt = _plt()
    kmax = max((_ks([r["eval"]]) or [1])[-1] for r in st.runs) if st.runs else 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), constrained_layout=True)
    for ax, k in zip(axes, (1, kmax)):
        for reading, marker in (("paper", "o"), ("mix", "s")):
            xs, ys = [], []
            for t in st.targets():
                runs = st.select("held", reading=reading, target=t)
                if runs:
                    xs.append(_mean(st.ratio(runs)))
                    ys.append(_passk([r["eval"] for r in runs], k))
            if xs:
                ax.plot(xs, ys, marker=marker, label=f"AEPO ({reading})")
        g = st.select("baseline", method="grpo")
        if g:
            ax.plot([_mean(st.ratio(g))], [_passk([r["eval"] for r in g], k)], "k*", markersize=12, label="GRPO")
        ax.set_xlabel("entropy at the end / H0")
        ax.set_ylabel(f"pass@{k}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Entropy vs performance on the held-out split (each point: one target, mean over seeds)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fig_robust(st: Study, path: Path) -> None:
    plt = _plt()
    bases = st.base_names("robust")
    if not bases:
        return
    fig, axes = plt.subplots(1, len(bases), figsize=(6 * len(bases), 4.2), sharey=True, squeeze=False, constrained_layout=True)
    for ax, b in zip(axes[0], bases):
        for r in st.select("robust", base=b):
            (line,) = ax.plot(r["steps"], r["series"]["entropy"], label=r["run"]["label"].split(" (")[0])
            if r["run"]["target"] is not None:
                ax.plot(r["steps"], r["series"]["entropy_target"], "--", color=line.get_color(), linewidth=1)
        ax.set_title(f"{b} base model")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("policy entropy (nats/token)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fig_length(st: Study, path: Path) -> None:
    """The length group: mean correct-response length per step, each run's target dashed."""
    runs = st.select("length")
    if not runs:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for r in runs:
        (line,) = ax.plot(r["steps"], r["series"].get("rollout/correct_length_mean") or [None] * len(r["steps"]),
                          label=r["run"]["label"], linewidth=2 if r["run"]["method"] == "aepo" else 1.5)
        if summarize_length(r)["target"] is not None:
            ax.plot(r["steps"], r["series"]["control/target"], "--", color=line.get_color(), linewidth=1)
    _finish_one_axes(fig, ax, path, "step", "mean correct-response length (tokens)",
                     "AEPO's length target on the toy task's length variant (dashed: targets)")


def length_table(st: Study) -> str:
    rows = []
    for r in st.select("length"):
        s = summarize_length(r)
        rows.append([r["run"]["label"], _f(s["l0"], 1), _f(s["target"], 1) if s["target"] is not None else "-",
                     _pct(s["held"]) if s["held"] is not None else "-",
                     f"{s['len_start']:.1f} -> {s['len_end']:.1f}", f"{s['len_min']:.1f} .. {s['len_max']:.1f}",
                     f"{s['reward_start']:.2f} -> {s['reward_end']:.2f}", _pct(s["pass1"])])
    return _table(["run", "L0 (step 1)", "target (tokens)", "held", "correct length, start -> end",
                   "second half min .. max", "reward start -> end", "pass@1 (held-out)"], rows)


def length_claim(st: Study) -> tuple[str, str, str, str] | None:
    """Beyond the paper (its Section 7): the general regulariser holds the mean correct length."""
    aepo = [r for r in st.select("length") if summarize_length(r)["target"] is not None]
    if not aepo:
        return None
    sums = [summarize_length(r) for r in aepo]
    txt = "; ".join(f"{r['run']['target']:g} x L0 ({s['target']:.1f} tokens): held {_pct(s['held'])}, reward "
                    f"{s['reward_start']:.2f} -> {s['reward_end']:.2f}" for r, s in zip(aepo, sums))
    for g in st.select("length", method="grpo"):
        gs = summarize_length(g)
        txt += f"; GRPO's correct length {gs['len_start']:.1f} -> {gs['len_end']:.1f} (end / L0 {gs['len_end'] / gs['l0']:.2f})"
    ok = [s["held"] >= LENGTH_HELD_SHARE and s["reward_end"] >= s["reward_start"] for s in sums]
    return ("length", "Section 7: another target distribution (response length) is held too: the mean correct length "
            f"within +-10% of 0.7 x and 1.3 x L0 on >= {LENGTH_HELD_SHARE:.0%} of the second half, reward not lost "
            "(toy task's length variant)", txt, _verdict(all(ok), partly=any(ok)))


# --- text --------------------------------------------------------------------------------------------


def _verdict(ok: bool | None, partly: bool = False) -> str:
    if ok is None:
        return "not measured"
    return "**confirmed**" if ok else ("**partly**" if partly else "**not confirmed**")


def claims(st: Study) -> list[tuple[str, str, str, str]]:
    """(id, claim, measured, verdict) for each claim of the paper the grid measures."""
    out = []
    # C1: arbitrary targets held
    for reading in st.readings():
        rows = [(t, st.s(st.select("held", method="aepo", reading=reading, target=t), "held")) for t in st.targets()]
        missing = [t for t, xs in rows if not xs]
        rows = [(t, xs) for t, xs in rows if xs]
        held = [t for t, xs in rows if all(x >= HELD_SHARE for x in xs)]
        text = ("share of the second half within +-10% (mean over seeds): " if reading == "paper" else "") + "; ".join(
            f"{t:g} x H0: {_pct(_mean(xs))}" for t, xs in rows)
        text += f"; held (>= 90% on every seed) at {len(held)} of {len(rows)} targets"
        if missing:
            text += " (not run yet: " + ", ".join(f"{t:g} x H0" for t in missing) + ")"
        claim = ("AEPO holds the entropy at arbitrary targets (Fig. 1), reading 'paper'" if reading == "paper"
                 else f"... the same under reading '{reading}' (the authors' code)")
        out.append(("held" if reading == "paper" else "held_mix", claim, text,
                    _verdict(len(held) == len(rows), partly=bool(held))))
    g = st.select("baseline", method="grpo")
    if g:
        r = st.ratio(g)
        out.append(("grpo", "GRPO collapses the entropy (Fig. 4)", f"end entropy / H0 = {_pm(r, lambda x: f'{x:.2f}')} (collapse: <= {COLLAPSE})",
                    _verdict(all(x <= COLLAPSE for x in r), partly=any(x <= COLLAPSE for x in r))))
    ereg = [(lab, runs) for lab, runs in _baseline_sets(st) if lab.startswith("Entropy-Reg")]
    if ereg:
        parts, drifted = [], []
        for lab, runs in ereg:
            r = st.ratio(runs)
            kind = "collapse" if all(x <= COLLAPSE for x in r) else "explosion" if all(x >= EXPLOSION for x in r) else "neither"
            parts.append(f"{lab.split()[-1]}: end / H0 = {_pm(r, lambda x: f'{x:.2f}')} ({kind})")
            drifted.append(kind != "neither")
        out.append(("entropy_reg", "Entropy-Reg drives the entropy to collapse or explosion (Fig. 3, 4)", "; ".join(parts),
                    _verdict(all(drifted), partly=any(drifted))))
    ea = st.select("baseline", method="entropy_adv")
    if ea:
        r = st.ratio(ea)
        out.append(("entropy_adv", "Entropy-Adv fails to sustain the entropy (Fig. 4)", f"end entropy / H0 = {_pm(r, lambda x: f'{x:.2f}')}",
                    _verdict(all(x <= COLLAPSE for x in r), partly=any(x < 1.0 for x in r))))
    for m, what in (("ablation_eq2", "Ablation (paper, Sec. 6.1): the REINFORCE samples drawn at T = 1 instead of the controller's T "
                                     "(`ablation_eq2`): the entropy falls like GRPO's, no control"),
                    ("ablation_eq3", "Ablation (paper, Sec. 6.2): temperature samples with their GRPO advantages, negatives kept "
                                     "(`ablation_eq3`): fails to prevent collapse")):
        runs = st.select("baseline", method=m)
        if not runs:
            continue
        t = runs[0]["run"]["target"]
        aepo = st.select("held", method="aepo", reading="paper", target=t)
        r, held = st.ratio(runs), st.s(runs, "held")
        txt = (f"target {t:g} x H0: held {_pct(_mean(held))} of the second half, end entropy / H0 = {_pm(r, lambda x: f'{x:.2f}')}"
               + (f" (AEPO at the same target: held {_pct(_mean(st.s(aepo, 'held')))}, end / H0 {_mean(st.ratio(aepo)):.2f})" if aepo else ""))
        fails = [h < HELD_SHARE for h in held]
        collapsed = [x <= COLLAPSE for x in r]
        out.append(("ablation", what, txt + f"; collapse (<= {COLLAPSE} x H0) on {sum(collapsed)} of {len(r)} seed(s)",
                    _verdict(all(fails) and all(collapsed), partly=all(fails))))
    # performance
    rows = _passk_rows(st)
    gr = next((ev for lab, ev, kind in rows if kind == "grpo"), None)
    base = next((ev for lab, ev, kind in rows if kind == "base"), None)
    aepo_rows = [(lab, ev) for lab, ev, kind in rows if kind == "paper"]
    if gr and aepo_rows:
        kmax = _ks(gr)[-1]
        b1 = [(lab, _passk(ev, 1) > _passk(gr, 1)) for lab, ev in aepo_rows]
        bk = [(lab, _passk(ev, kmax) > _passk(gr, kmax)) for lab, ev in aepo_rows]
        wins1, winsk = [lab.split(") ")[1] for lab, ok in b1 if ok], [lab.split(") ")[1] for lab, ok in bk if ok]
        out.append(("beats_grpo", "Across all entropy levels AEPO outperforms GRPO (pass@1 and pass@k)",
                    f"GRPO pass@1 {_pct(_passk(gr, 1))}, pass@{kmax} {_pct(_passk(gr, kmax))}; AEPO above GRPO on pass@1 at "
                    f"{len(wins1)} of {len(b1)} targets ({', '.join(wins1) or 'none'}), on pass@{kmax} at {len(winsk)} of {len(bk)} "
                    f"({', '.join(winsk) or 'none'})",
                    _verdict(all(ok for _, ok in b1 + bk), partly=bool(wins1 or winsk))))
        if base:
            bestk = max(_passk(ev, kmax) for _, ev in aepo_rows)
            out.append(("beyond_base", f"AEPO explores beyond the base model at large k (pass@{kmax} above the base model's), GRPO does not",
                        f"base pass@{kmax} {_pct(_passk(base, kmax))}, GRPO {_pct(_passk(gr, kmax))}, best AEPO target {_pct(bestk)}",
                        _verdict(bestk > _passk(base, kmax) and _passk(gr, kmax) <= _passk(base, kmax),
                                 partly=bestk > _passk(base, kmax))))
    if len(aepo_rows) >= 3:
        p1 = [(_passk(ev, 1), lab.split(") ")[1], ev) for lab, ev in aepo_rows]
        vals = [v for v, _, _ in p1]
        i = max(range(len(vals)), key=vals.__getitem__)
        se = _mean([_se(e) for _, _, evs in p1 for e in evs])
        interior = 0 < i < len(vals) - 1
        margin = min(vals[i] - vals[0], vals[i] - vals[-1])
        out.append(("nonmono", "Performance is non-monotonic in the entropy target: it rises, then falls (Table 3)",
                    "pass@1 by target: " + ", ".join(f"{lab}: {_pct(v)}" for v, lab, _ in p1)
                    + (f"; maximum at {p1[i][1]}, {100 * margin:.1f} points above the higher end point" if interior
                       else f"; maximum at an end point ({p1[i][1]})")
                    + f" (standard error of one pass@1 over problems: {100 * se:.1f} points)",
                    _verdict(interior and margin > 2 * se, partly=interior)))
    for b in st.base_names("robust"):
        runs = [r for r in st.select("robust", base=b) if r["run"]["target"] is not None]
        g = [r for r in st.select("robust", base=b) if r["run"]["method"] == "grpo"]
        txt = "; ".join(f"{r['run']['target']:g} x H0: held {_pct(st.sum[r['name']]['held'])}" for r in runs)
        if g:
            txt += f"; GRPO end / H0 {st.ratio(g)[0]:.2f}"
        be = st.bases.get(b, {}).get("eval")
        if be:
            txt += f"; base pass@1 {_pct(be['avg_at_n'])}"
        ok = [st.sum[r["name"]]["held"] >= HELD_SHARE for r in runs]
        if not ok:  # no AEPO run on this base has finished: nothing to judge
            continue
        out.append(("robust", f"Robustness: the controller holds its targets on the {b} base model", txt, _verdict(all(ok), partly=any(ok))))
    c = controller_claim(st)
    if c:
        out.append(c)
    out += hold_claims(st)
    length = length_claim(st)
    if length:
        out.append(length)
    return out


CONTROLLER_KEY = "algorithm.controller."


def option_pairs(st: Study, group: str) -> list[tuple[dict, dict | None]]:
    """Each AEPO run of ``group`` with controller options, with the paper's controller's run that is
    the same run without them: same base, seed, target and step count, its other options equal
    (e.g. the hold group's 64 prompts), from any group; None while no such run has finished."""
    pairs = []
    for r in st.select(group, method="aepo"):
        spec = r["run"]
        others = [list(o) for o in spec["options"] if not o[0].startswith(CONTROLLER_KEY)]
        if len(others) == len(spec["options"]):
            continue  # no controller option: the paper's controller itself
        paper = [p for p in st.select(method="aepo", reading="paper", target=spec["target"], base=spec["base"], options=others)
                 if p["run"]["seed"] == spec["seed"] and len(p["steps"]) == len(r["steps"])]
        pairs.append((r, paper[0] if paper else None))
    return pairs


def hold_rows(st: Study) -> list[tuple[dict, dict | None]]:
    return option_pairs(st, "hold")


def hold_claims(st: Study) -> list[tuple[str, str, str, str]]:
    """The built-in task's bar at the default run's length: the option holds 0.5 and 1.5 x H0 on every base
    seed with reward not lower at the end than at the start; GRPO ends at <= COLLAPSE x H0."""
    out = []
    rows = [(r, p) for r, p in hold_rows(st) if r["run"]["base"].startswith("seed")]
    if rows:
        parts, ok = [], []
        for r, p in rows:
            s = st.sum[r["name"]]
            good = s["held"] >= HELD_SHARE and s["reward_end"] >= s["reward_start"]
            ok.append(good)
            parts.append(f"{r['run']['base']} {r['run']['target']:g} x H0: {_pct(s['held'])}, reward "
                         f"{s['reward_start']:.2f} -> {s['reward_end']:.2f}"
                         + (f" (paper's controller {_pct(st.sum[p['name']]['held'])})" if p else ""))
        out.append(("hold", f"Beyond the paper: at the default run's length ({len(rows[0][0]['steps'])} steps) the option "
                    f"`{_option(rows[0][0])}` holds 0.5 and 1.5 x H0 on every base seed (>= {HELD_SHARE:.0%} of the second half, "
                    "reward not lower at the end)", "; ".join(parts) + f"; met on {sum(ok)} of {len(ok)} runs",
                    _verdict(all(ok), partly=any(ok))))
    grpo = st.select("hold", method="grpo")
    if grpo:
        ratios = st.ratio(grpo)
        ok = [x <= COLLAPSE for x in ratios]
        out.append(("hold_grpo", f"GRPO collapses the entropy at the default run's length ({len(grpo[0]['steps'])} steps, the "
                    f"hold group's batch): end <= {COLLAPSE} x H0 on every seed",
                    "end entropy / H0 by seed: " + ", ".join(f"{r['run']['base']} {x:.2f}" for r, x in zip(grpo, ratios))
                    + f"; <= {COLLAPSE} on {sum(ok)} of {len(ok)}", _verdict(all(ok), partly=any(ok))))
    return out


def hold_table(st: Study) -> str:
    rows = []
    for r, p in hold_rows(st):
        s, q = st.sum[r["name"]], st.sum[p["name"]] if p else None
        spec = r["run"]
        rows.append([spec["base"], f"{spec['target']:g}", _f(s["h0"]), _f(s["target"]), _pct(s["held"]),
                     _pct(q["held"]) if q else "-", _pct(s.get("reading_se")),
                     _f(s["h_end"]) + (f" / {_f(q['h_end'])}" if q else ""),
                     str(s["first_in_band"]), f"{s['reward_start']:.2f} -> {s['reward_end']:.2f}"
                     + (f" / {q['reward_start']:.2f} -> {q['reward_end']:.2f}" if q else ""),
                     _pct(s["pass1"]) + (f" / {_pct(q['pass1'])}" if q else "")])
    for r in st.select("hold", method="grpo"):
        s = st.sum[r["name"]]
        rows.append([r["run"]["base"], "GRPO", _f(s["h0"]), "-", "-", "-", "-", f"{_f(s['h_end'])} ({s['h_end'] / s['h0']:.2f} x H0)",
                     "-", f"{s['reward_start']:.2f} -> {s['reward_end']:.2f}", _pct(s["pass1"])])
    if not rows:
        return "(no runs of the hold group)"
    return _table(["base", "target / H0", "H0", "target", "held, option", "held, paper",
                   "reading s.e. / target (option, second half)", "entropy at the end (option / paper)",
                   "first step in band", "reward start -> end (option / paper)", "pass@1 (option / paper)"], rows)


def controller_pairs(st: Study) -> list[tuple[dict, dict | None]]:
    return option_pairs(st, "controller")


def _option(r: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["run"]["options"])


def controller_claim(st: Study) -> tuple[str, str, str, str] | None:
    pairs = controller_pairs(st)
    if not pairs:
        return None
    held = [st.sum[r["name"]]["held"] for r, _ in pairs]
    parts = []
    for r, p in pairs:
        spec = r["run"]
        parts.append(f"{spec['base']} {spec['target']:g} x H0: {_pct(st.sum[r['name']]['held'])}"
                     + (f" (paper {_pct(st.sum[p['name']]['held'])})" if p else ""))
    ok = [h >= HELD_SHARE for h in held]
    text = (f"{_option(pairs[0][0])}, share of the second half within +-10%: " + "; ".join(parts)
            + f"; held on {sum(ok)} of {len(ok)} runs")
    paper = [(st.sum[r["name"]]["held"], st.sum[p["name"]]["held"]) for r, p in pairs if p]
    if paper:
        text += (f"; mean {_pct(_mean([a for a, _ in paper]))} against the paper's controller's {_pct(_mean([b for _, b in paper]))}"
                 " on the same runs")
    return ("controller", "Beyond the paper: a controller option holds the lowest and highest target on every base model",
            text, _verdict(all(ok), partly=any(ok)))


def controller_table(st: Study) -> str:
    rows = []
    for r, p in controller_pairs(st):
        s, q = st.sum[r["name"]], st.sum[p["name"]] if p else None
        spec = r["run"]
        rows.append([spec["base"], f"{spec['target']:g}", _option(r),
                     _pct(q["held"]) if q else "not run", _pct(s["held"]),
                     f"{_f(q['h_end'])} / {_f(s['h_end'])}" if q else _f(s["h_end"]),
                     (f"{q['reward_start']:.2f} -> {q['reward_end']:.2f} / " if q else "") + f"{s['reward_start']:.2f} -> {s['reward_end']:.2f}",
                     (f"{_pct(q['pass1'])} / " if q else "") + _pct(s["pass1"])])
    if not rows:
        return "(no runs of the controller group)"
    return _table(["base", "target / H0", "option", "held, paper", "held, option", "entropy at the end (paper / option)",
                   "reward start -> end (paper / option)", "pass@1 (paper / option)"], rows)


def _se(ev: dict) -> float:
    """Standard error over problems of one evaluation's pass@1 (from the per-problem correct counts)."""
    c, n = ev.get("per_problem_correct"), ev.get("n")
    if not c or not n or len(c) < 2:
        return float("nan")
    return statistics.stdev([x / n for x in c]) / math.sqrt(len(c))


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def held_table(st: Study) -> str:
    rows = []
    for reading in st.readings():
        for t in st.targets():
            runs = st.select("held", reading=reading, target=t)
            if not runs:
                continue
            rows.append([reading, f"{t:g}", _pm(st.s(runs, "h0")), _pm(st.s(runs, "target")), _pm(st.s(runs, "h_end")),
                         " / ".join(_pct(x) for x in st.s(runs, "held")),
                         " / ".join(str(x) if x is not None else "never" for x in st.s(runs, "first_in_band")),
                         f"{_mean(st.s(runs, 'reward_start')):.2f} -> {_mean(st.s(runs, 'reward_end')):.2f}"])
    return _table(["reading", "target / H0", "H0", "target (nats)", "entropy at the end", "held (per seed)",
                   "first step in band (per seed)", "reward start -> end"], rows)


def baseline_table(st: Study) -> str:
    rows = []
    for label, runs in _baseline_sets(st):
        rows.append([label, _pm(st.s(runs, "h0")), _pm(st.s(runs, "h_end")), _pm(st.ratio(runs), lambda x: f"{x:.2f}"),
                     f"{_mean(st.s(runs, 'h_min')):.3f} .. {_mean(st.s(runs, 'h_max')):.3f}",
                     _pct(_mean(st.s(runs, "held"))) if runs[0]["run"]["target"] is not None else "-",
                     f"{_mean(st.s(runs, 'reward_start')):.2f} -> {_mean(st.s(runs, 'reward_end')):.2f}",
                     _pct(_mean(st.s(runs, "pass1")))])
    return _table(["run", "H0", "entropy at the end", "end / H0", "min .. max", "held", "reward start -> end", "pass@1 (held-out)"], rows)


def perf_table(st: Study) -> str:
    rows = _passk_rows(st)
    if not rows:
        return "(no evaluations)"
    ks = [k for k in _ks(rows[0][1]) if k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)]
    show = [k for k in ks if k in (1, 4, 16, 64) or k == ks[-1]]
    out = []
    for label, evals, kind in rows:
        ent = _mean([e.get("entropy_nll") for e in evals])
        out.append([label, str(len(evals)), _f(ent)] + [_pct(_passk(evals, k)) for k in show])
    return _table(["policy", "seeds", "entropy on the held-out samples"] + [f"pass@{k}" for k in show], out)


def robust_table(st: Study) -> str:
    rows = []
    for b in st.base_names("robust"):
        be = st.bases.get(b, {})
        for r in st.select("robust", base=b):
            s = st.sum[r["name"]]
            rows.append([b, f"noise {be.get('recipe', {}).get('noise', '?')}", _pct(be.get("eval", {}).get("avg_at_n")),
                         r["run"]["label"].split(" (")[0], _f(s["h0"]), _f(s["target"]) if s["target"] else "-", _f(s["h_end"]),
                         _pct(s["held"]) if s["held"] is not None else "-", f"{s['reward_start']:.2f} -> {s['reward_end']:.2f}",
                         _pct(s["pass1"])])
    return _table(["base", "recipe", "base pass@1", "run", "H0", "target", "entropy at the end", "held", "reward start -> end",
                   "pass@1 after"], rows)


def time_section(data: dict, st: Study) -> str:
    runs = st.runs
    fresh = [r for r in runs if r.get("resumed_from") in ("new", "restart")]
    wall = [r["wall_s"]["train"] + r["wall_s"]["eval"] for r in fresh]
    cpu = [r.get("cpu_s", {}).get("train", 0) + r.get("cpu_s", {}).get("eval", 0) for r in fresh]
    m = data.get("machine", {})
    cores = m.get("cores") or 2
    load = m.get("loadavg_end") or []
    lines = [f"Machine: {m.get('cpu', '?')}, {cores} cores, AVX-512 {'yes' if m.get('avx512') else 'no'}; load average at "
             f"the end {', '.join(f'{x:.1f}' for x in load)} (1, 5, 15 min; {cores}.0 = every core busy)."]
    if fresh:
        base_cpu = sum(sum((b.get("cpu_s") or {}).values()) for b in data.get("bases", []))
        total_cpu = sum(cpu) + base_cpu
        if data.get("collected"):
            lines.append(f"This report was assembled (`--collect`) from the {len(runs)} finished runs of the work directory "
                         f"({data['grid'].get('n_runs', '?')} in the grid).")
        else:
            w = data["wall_s"]
            lines.append(f"This study, in one invocation: {len(runs)} runs and {len(data.get('bases', []))} base models with "
                         f"{data.get('workers')} workers in **{w / 60:.1f} min** (the estimate printed at the start: "
                         f"{data.get('estimate_s', float('nan')) / 60:.0f} min); {total_cpu / 60:.0f} CPU-min of jobs "
                         f"({base_cpu / 60:.0f} of them building and evaluating the base models), so {cores} cores were "
                         f"{100 * total_cpu / (w * cores):.0f}% busy with them.")
        lines.append(f"Per run (training + held-out evaluation, {len(fresh)} runs made from scratch): wall "
                     f"{_mean(wall):.0f} s (min {min(wall):.0f}, max {max(wall):.0f}; the evaluation "
                     f"{_mean([r['wall_s']['eval'] for r in fresh]):.0f} s of it), CPU {_mean(cpu):.0f} s.")
        by_len: dict[int, list[float]] = {}
        for r in fresh:
            if r.get("cpu_s") and r.get("steps"):
                by_len.setdefault(len(r["steps"]), []).append(r["cpu_s"]["train"] / len(r["steps"]))
        per_step = "; ".join(f"{_mean(v):.2f} over the {len(v)} runs of {n} steps" for n, v in sorted(by_len.items()))
        lines.append(f"CPU time is what extrapolates across loads: CPU-s per training step, start-up included: {per_step}.")
        if data.get("quick"):
            lines.append(f"At the measured CPU per run the quick grid ({data['grid'].get('n_runs', '?')} runs) is "
                         f"{_mean(cpu) * (data['grid'].get('n_runs') or 0) / 60:.0f} CPU-min, about "
                         f"{_mean(cpu) * (data['grid'].get('n_runs') or 0) / 60 / (2 * PARALLEL_EFFICIENCY):.0f} min on 2 "
                         f"otherwise idle cores (at the plan's measured {PARALLEL_EFFICIENCY:.0%} core use).")
        lines.append("`python tools/reproduce.py --plan` prints the estimate for any grid (from this study's own finished runs "
                     "once there are some).")
    return "\n".join(lines)


def theory_section(th: dict | None) -> str:
    if not th:
        return "Not run (`--no-theory`)."
    lines = [th.get("intro", ""), "", _table(["check", "measured", "verdict"],
                                              [[c["name"], c["measured"], "measured" if c["ok"] is None else "**pass**" if c["ok"] else "**fail**"]
                                               for c in th["checks"]])]
    return "\n".join(lines)


def write(data: dict, out: Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st = Study(data)
    fig_targets(st, out / FIGURES["fig1"])
    fig_baselines(st, out / FIGURES["fig4"])
    fig_passk(st, out / FIGURES["passk"])
    fig_entropy_perf(st, out / FIGURES["perf"])
    fig_robust(st, out / FIGURES["robust"])
    fig_length(st, out / FIGURES["length"])
    th = data.get("theory")
    if th and th.get("figure"):
        _theory_figure(th["figure"], out / FIGURES["theory"])
    g = data["grid"]
    ev = g["eval"]
    cl = claims(st)
    quick = data.get("quick")
    md = [
        "# Reproduction study: AEPO's claims on the built-in task",
        "",
        f"Made by `{data['command']}` (commit `{data.get('commit', '?')}`, {data['created']}): "
        f"{len(st.runs)} training runs of {' or '.join(str(n) for n in sorted({len(r['steps']) for r in st.runs}))} steps "
        f"(the grid's {g['steps']}; the hold group's runs are the default run's length) on {len(st.bases)} base models, seeds {g['seeds']}, each evaluated on "
        f"{ev['problems']} held-out problems of the toy task's test split (disjoint from the training problems) with "
        f"{ev['n']} samples each at T = {ev['temperature']:g}: pass@1 is avg@{ev['n']}, pass@k the unbiased estimator up to "
        f"k = {ev['n']}. Everything below is computed from those runs (`runs.json` holds every number; "
        "`python tools/reproduce.py --report-only` redraws this page)."
        + (" **This is the quick grid (`--quick`): one seed and short runs; the full grid (three seeds, 60 steps) "
           "is `python tools/reproduce.py --out docs/results`.**" if quick else "")
        + (f" **A part of the grid: {len(st.runs)} of its {g.get('n_runs', '?')} runs had finished when this page "
           "was assembled (`--collect`; the rest are listed under \"Runs not finished\"); the tables show the seeds each "
           "figure rests on. `python tools/reproduce.py --out docs/results` runs the rest (finished runs are "
           "skipped) and rewrites the page.**" if data.get("collected") and len(st.runs) < g.get("n_runs", 0) else ""),
        "",
        f"Targets are multiples of H0, the run's entropy at step 1 (`--algorithm.controller.target=X "
        f"--algorithm.controller.target_relative=true`). **Held**: at least {HELD_SHARE:.0%} of the second half of the steps within "
        f"+-{BAND:.0%} of the target. **Collapse**: entropy at the end (mean of the last 10% of the steps) <= {COLLAPSE} x H0; "
        f"**explosion**: >= {EXPLOSION} x H0. Every run uses the default run's settings (`configs/toy.yaml`: 16 prompts x 8 samples "
        "a step, lr 1e-3, T_high / T_low 1.2 / 0.8, budgets 60 / 30) except the method and the keys named.",
        "",
        f"![Fig. 1 reproduced]({FIGURES['fig1']})",
        "",
        "## The paper's claims, as measured",
        "",
        _table(["claim", "measured here", "verdict"], [c[1:] for c in cl]),
        "",
        "## Entropy held at arbitrary targets (Fig. 1)",
        "",
        held_table(st),
        "",
        "## Baselines and ablations (Fig. 4)",
        "",
        f"![Fig. 4 reproduced]({FIGURES['fig4']})",
        "",
        baseline_table(st),
        "",
        "## Performance on the held-out split",
        "",
        perf_table(st),
        "",
        f"![pass@k]({FIGURES['passk']})",
        "",
        f"![entropy vs performance]({FIGURES['perf']})",
        "",
        "## Robustness: weaker and stronger base models",
        "",
        robust_table(st),
        "",
        *([f"![robustness]({FIGURES['robust']})", ""] if st.base_names("robust") else []),
        *(["## Beyond the paper: a controller that holds the target", "",
           "The paper's controller (full budget, T by the sign of the error) against the option "
           "`--algorithm.controller.budget_mode=pid --algorithm.controller.budget_down=60` (the budget from the "
           "relative error, its slope and its sum, up to 60 positives either way; docs/training.md, \"Holding an "
           "entropy target\") at the lowest and highest target, same base, seed and settings.", "",
           controller_table(st), ""] if st.select("controller") else []),
        *(["## Beyond the paper: holding 0.5 and 1.5 x H0 at the default run's length", "",
           "The bar set for the built-in task: at the default run's length (100 steps; the second half is steps 51-100), "
           "targets 0.5 and 1.5 x H0 held with reward not lower at the end, on every base. The option (`configs/toy_hold.yaml`) `--algorithm.controller.budget_mode=proportional --algorithm.controller.budget_down=60` "
           "(the paper's temperature rule; the number of positives kept shrinks with the distance to the target, and lowering "
           "may keep as many as raising) with 64 prompts a step (`--data.prompts_per_step=64`: at 0.5 x H0 the per-step "
           "entropy reading's own standard error is 4-10% of the target with 16 prompts, so even a perfectly held policy "
           "would read outside +-10% on many steps, and on the least accurate base no method learns with 16 or 32 prompts). "
           "Beside it, GRPO with the same batch and length on each seed and the paper's controller on the first. "
           "*Reading s.e.* is the step's `policy/entropy_full_stderr` over the target, averaged over the second half. "
           "docs/training.md, \"At the default run's length\", has the commands.", "",
           hold_table(st), ""] if st.select("hold") else []),
        *(["## Beyond the paper: a response-length target (Section 7)", "",
           "AEPO's regulariser with the length target distribution (`--algorithm.controller.signal=length`, "
           "docs/targets.md) on the toy task's length variant (`--data.toy_variant=length`: a free number of opening "
           "filler words, so correct answers can be shorter or longer; its own base model). L0 is the run's mean "
           "correct-response length at step 1; targets are 0.7 and 1.3 x L0 (`target_relative=true`). **Held** here: "
           f"`control/signal` within +-{BAND:.0%} of `control/target` on at least {LENGTH_HELD_SHARE:.0%} of the second "
           "half of the steps (issue 13's bar).", "", length_table(st), "",
           f"![length target]({FIGURES['length']})", ""] if st.select("length") else []),
        "## Appendix B, checked numerically with the project's code",
        "",
        theory_section(th),
        "",
        *( [f"![Appendix B]({FIGURES['theory']})", ""] if th and th.get("figure") else []),
        "## Where the toy does not reproduce a claim, and why",
        "",
        why_section(cl, st),
        "",
        "## Time",
        "",
        time_section(data, st),
        "",
    ]
    if data.get("errors"):
        md += ["## Runs not finished" if data.get("collected") else "## Runs that failed", "",
               *[f"- {e}" for e in data["errors"]], ""]
    path = out / "README.md"
    path.write_text("\n".join(md))
    return path


def _slope(r: dict) -> float:
    """Least-squares slope of entropy / H0 per step over the run."""
    h = r["series"]["entropy"]
    pts = [(x, y / h[0]) for x, y in zip(r["steps"], h) if isinstance(y, (int, float))]
    n = len(pts)
    if n < 2:
        return float("nan")
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else float("nan")


def _drift(st: Study, runs: Sequence[dict], level: float) -> str:
    """'ends at E x H0 after N steps, moving S x H0 a step: at that rate LEVEL x H0 at about step K'."""
    if not runs:
        return ""
    end, slope = _mean(st.ratio(runs)), _mean([_slope(r) for r in runs])
    n = runs[0]["steps"][-1]
    txt = f"ends at {end:.2f} x H0 after {n} steps, moving {slope:+.4f} x H0 a step over the run"
    if slope and math.isfinite(slope) and (level - end) / slope > 0:
        txt += f": at that rate {level:g} x H0 would come at about step {n + (level - end) / slope:.0f}"
    elif math.isfinite(slope):
        txt += f", away from {level:g} x H0"
    return txt


def _misses(st: Study, runs: Sequence[dict]) -> str:
    above = below = total = 0
    for r in runs:
        h, t = r["series"]["entropy"], r["series"]["entropy_target"]
        half = len(h) // 2
        for hh, tt in zip(h[half:], t[half:]):
            if isinstance(hh, (int, float)) and isinstance(tt, (int, float)) and tt > 0:
                total += 1
                above += hh > (1 + BAND) * tt
                below += hh < (1 - BAND) * tt
    return f"{above} of its {total} second-half steps above the band, {below} below"


def why_section(cl: Sequence[tuple[str, str, str, str]], st: Study) -> str:
    """For each claim not (fully) confirmed: what the runs show about why, from their numbers."""
    out = []
    for cid, claim, _, verdict in cl:
        if "**confirmed**" == verdict:
            continue
        why = []
        if cid in ("held", "held_mix"):
            reading = "paper" if cid == "held" else "mix"
            for t in st.targets():
                runs = st.select("held", reading=reading, target=t)
                held = st.s(runs, "held")
                if runs and not all(x >= HELD_SHARE for x in held):
                    firsts = [x for x in st.s(runs, "first_in_band")]
                    why.append(f"{t:g} x H0: {_misses(st, runs)}; first step in the band "
                               + ", ".join(str(x) if x is not None else "never" for x in firsts)
                               + f"; entropy at the end {_mean(st.s(runs, 'h_end')):.3f} for a target of {_mean(st.s(runs, 'target')):.3f}")
        elif cid == "grpo":
            why.append("GRPO " + _drift(st, st.select("baseline", method="grpo"), COLLAPSE))
        elif cid == "entropy_reg":
            for label, runs in _baseline_sets(st):
                if label.startswith("Entropy-Reg"):
                    slope = _mean([_slope(r) for r in runs])
                    level = EXPLOSION if slope > 0 else COLLAPSE
                    why.append(f"{label} {_drift(st, runs, level)}")
        elif cid == "entropy_adv":
            why.append("Entropy-Adv " + _drift(st, st.select("baseline", method="entropy_adv"), COLLAPSE))
        elif cid == "ablation":
            m = "ablation_eq2" if "ablation_eq2" in claim else "ablation_eq3"
            runs = st.select("baseline", method=m)
            why.append(f"`{m}` {_drift(st, runs, COLLAPSE)}; held {_pct(_mean(st.s(runs, 'held')))} of the second half "
                       f"({_misses(st, runs)})")
        elif cid in ("beats_grpo", "beyond_base", "nonmono"):
            rows = _passk_rows(st)
            gr = next((ev for _, ev, kind in rows if kind == "grpo"), [])
            base = next((ev for _, ev, kind in rows if kind == "base"), [])
            aepo = [(lab.split(") ")[1], ev) for lab, ev, kind in rows if kind == "paper"]
            se = 100 * _mean([_se(e) for _, evs in aepo for e in evs])  # as in the claims table
            probs = st.runs[0]["eval"].get("problems") or len(st.runs[0]["eval"].get("per_problem_correct") or []) or 0
            if cid == "beats_grpo" and gr:
                kmax = _ks(gr)[-1]
                why.append("pass@1 minus GRPO's, by target: " + ", ".join(
                    f"{lab} {100 * (_passk(ev, 1) - _passk(gr, 1)):+.1f}" for lab, ev in aepo)
                    + f" points; pass@{kmax}: " + ", ".join(f"{lab} {100 * (_passk(ev, kmax) - _passk(gr, kmax)):+.1f}" for lab, ev in aepo)
                    + f" points. One pass@1 has a standard error of about {se:.1f} points over the {probs} held-out problems")
            elif cid == "beyond_base" and gr and base:
                kmax = _ks(gr)[-1]
                why.append(f"pass@{kmax} counts the problems solved at least once in {kmax} samples: one of the {probs} problems is "
                           f"{100 / max(1, probs):.1f} points; base {_pct(_passk(base, kmax))}, GRPO {_pct(_passk(gr, kmax))}, AEPO "
                           + ", ".join(f"{lab} {_pct(_passk(ev, kmax))}" for lab, ev in aepo))
            elif cid == "nonmono" and aepo:
                vals = [100 * _passk(ev, 1) for _, ev in aepo]
                why.append(f"pass@1 spans {max(vals) - min(vals):.1f} points over the targets, against a standard error of about "
                           f"{se:.1f} points for one run")
        elif cid == "length":
            for r in st.select("length"):
                s = summarize_length(r)
                if s["target"] is not None and (s["held"] < LENGTH_HELD_SHARE or s["reward_end"] < s["reward_start"]):
                    why.append(f"{r['run']['label']}: held {_pct(s['held'])}, correct length {s['len_start']:.1f} -> "
                               f"{s['len_end']:.1f} for a target of {s['target']:.1f} (second half {s['len_min']:.1f} .. "
                               f"{s['len_max']:.1f}); reward {s['reward_start']:.2f} -> {s['reward_end']:.2f}")
        elif cid == "robust":
            b = claim.split(" on the ")[1].split(" base")[0]
            for r in st.select("robust", base=b):
                if r["run"]["target"] is not None and st.sum[r["name"]]["held"] < HELD_SHARE:
                    why.append(f"{r['run']['label']}: {_misses(st, [r])}; reward {st.sum[r['name']]['reward_start']:.2f} -> "
                               f"{st.sum[r['name']]['reward_end']:.2f}")
        elif cid == "hold":
            for r, _ in hold_rows(st):
                s = st.sum[r["name"]]
                if r["run"]["base"].startswith("seed") and (s["held"] < HELD_SHARE or s["reward_end"] < s["reward_start"]):
                    why.append(f"{r['run']['label']} on {r['run']['base']}: {_misses(st, [r])}; reward {s['reward_start']:.2f} -> "
                               f"{s['reward_end']:.2f}")
        elif cid == "hold_grpo":
            for r in st.select("hold", method="grpo"):
                s = st.sum[r["name"]]
                if s["h_end"] > COLLAPSE * s["h0"]:
                    why.append(f"GRPO on {r['run']['base']} " + _drift(st, [r], COLLAPSE)
                               + f"; reward {s['reward_start']:.2f} -> {s['reward_end']:.2f}")
        elif cid == "controller":
            for r, _ in controller_pairs(st):
                if st.sum[r["name"]]["held"] < HELD_SHARE:
                    why.append(f"{r['run']['label']}: {_misses(st, [r])}; reward {st.sum[r['name']]['reward_start']:.2f} -> "
                               f"{st.sum[r['name']]['reward_end']:.2f}")
        out.append(f"- *{claim}* ({verdict.strip('*')}): " + "; ".join(why) + ".")
    return "\n".join(out) if out else "Every claim measured here is confirmed."


def _theory_figure(fig: dict, path: Path) -> None:
    plt = _plt()
    f, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    ax = axes[0]
    ax.scatter(fig["dh1"], fig["ddh"], s=3, alpha=0.4)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.axvline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("Delta H(1) (first-order entropy change, project loss + head)")
    ax.set_ylabel("d Delta H / dT at T = 1")
    ax.set_title("Theorem 4.3: Delta H(1) < 0 => derivative > 0")
    ax = axes[1]
    for name, ys in fig["closed_loop"].items():
        ax.plot(ys, label=name)
    for t in fig.get("closed_loop_targets", []):
        ax.axhline(t, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("update")
    ax.set_ylabel("mean entropy of the tabular policies")
    ax.set_title("Controller + aepo loss on tabular policies")
    ax.legend(fontsize="small")
    f.savefig(path, dpi=100)
    plt.close(f)
