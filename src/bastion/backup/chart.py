"""A drill's PNG chart: requests per second and the error rate over time, the
incident's moments marked, the headline figure against its target in the title.

matplotlib is imported inside :func:`write_chart` (with the Agg canvas: no
display, no pyplot global state), so commands that draw nothing do not pay
for it at start-up.
"""

from __future__ import annotations

from pathlib import Path

from bastion.backup.drills import BIN_SECONDS, DrillResult

OUTCOMES = (("ok", "tab:green"), ("refused", "tab:blue"), ("failed", "tab:red"))


def headline(result: DrillResult) -> str:
    """The first target's figure against it, e.g. ``rto_seconds 0.41 (target <= 10)``."""
    for key, target in result.targets.items():
        value = result.figures.get(key)
        shown = "-" if value is None else f"{value:g}"
        return f"{key} {shown} (target {target})"
    return ""


def _bins(result: DrillResult) -> tuple[list[float], dict[str, list[float]]]:
    """Every quarter second from 0 to the last one recorded (an empty bin is a
    zero, not a gap), each outcome as a rate per second."""
    slots = {round(float(slot["t"]) / BIN_SECONDS): slot for slot in result.timeline}
    last = max(slots, default=-1)
    starts = [k * BIN_SECONDS for k in range(last + 1)]
    rates = {
        outcome: [int(slots.get(k, {}).get(outcome, 0)) / BIN_SECONDS for k in range(last + 1)]
        for outcome, _colour in OUTCOMES
    }
    return starts, rates


def write_chart(result: DrillResult, path: Path) -> None:
    """Draw ``result`` as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    starts, rates = _bins(result)
    totals = [sum(rates[o][i] for o, _c in OUTCOMES) for i in range(len(starts))]
    error_rate = [
        100 * failed / total if total else 0.0
        for failed, total in zip(rates["failed"], totals, strict=True)
    ]

    figure = Figure(figsize=(9, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    load, errors = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    bottom = [0.0] * len(starts)
    for outcome, colour in OUTCOMES:
        load.bar(
            starts,
            rates[outcome],
            width=BIN_SECONDS,
            bottom=bottom,
            align="edge",
            color=colour,
            label=outcome,
        )
        bottom = [b + r for b, r in zip(bottom, rates[outcome], strict=True)]
    load.set_ylabel("requests / s")
    load.legend(loc="upper right", fontsize="small")
    errors.step(
        [*starts, len(starts) * BIN_SECONDS],
        [*error_rate, error_rate[-1] if error_rate else 0.0],
        where="post",
        color="tab:red",
    )
    errors.set_ylim(0, 105)
    errors.set_ylabel("error rate (%)")
    errors.set_xlabel("seconds since the drill's load began")
    for label, moment in result.marks.items():
        for axes in (load, errors):
            axes.axvline(moment, color="black", linestyle="--", linewidth=1)
        load.annotate(
            label,
            (moment, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            rotation=90,
            va="top",
            fontsize="small",
        )
    verdict = "INTERRUPTED" if result.interrupted else ("PASSED" if result.passed else "FAILED")
    figure.suptitle(f"drill {result.name}: {headline(result)} — {verdict}")
    figure.savefig(path, format="png")
