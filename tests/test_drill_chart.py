"""A drill's PNG chart (issue 20 item 3): requests per second and the error
rate over time with the incident's moments marked, drawn with matplotlib's Agg
canvas from a synthetic result (a real one: tests/test_backup.py's db-kill)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from PIL import Image

from bastion.backup.chart import headline, write_chart
from bastion.backup.cli import _report
from bastion.backup.drills import DrillResult

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _outage() -> DrillResult:
    """Four seconds of load, all failing between the marks at 1.0 s and 2.0 s."""
    result = DrillResult(
        "provider-outage",
        figures={"first_cached_answer_seconds": 0.4, "failed_during_outage": 0},
        targets={"first_cached_answer_seconds": "<= 1", "failed_during_outage": "0"},
        passed=True,
    )
    for k in range(16):
        t = k * 0.25
        down = 1.0 <= t < 2.0
        result.timeline.append({"t": t, "ok": 0 if down else 20, "refused": 0, "failed": 20 * down})
    result.mark("provider down", 1.0)
    result.mark("provider up", 2.0)
    return result


def red_pixels(rgb: Image.Image) -> int:
    """Pixels in matplotlib's tab:red (214, 39, 40): the failed bars and the error rate."""
    return sum(n for n, colour in rgb.getcolors(maxcolors=1 << 20) or [] if colour == (214, 39, 40))


def assert_chart(path: Path) -> Image.Image:
    """A real PNG of the chart's size that draws something: decoded, not just named."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()  # decodes every pixel: a truncated or corrupt file raises
        assert image.format == "PNG"
        assert image.size == (900, 550)
        rgb = image.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20  # bars, lines and text, not a blank
    return rgb


def test_a_drill_chart_is_a_valid_png_with_the_failures_and_the_marks(tmp_path: Path) -> None:
    result = _outage()
    write_chart(result, tmp_path / "outage.png")
    rgb = assert_chart(tmp_path / "outage.png")
    assert red_pixels(rgb) > 20_000  # a second of failed bars, full height
    assert headline(result) == "first_cached_answer_seconds 0.4 (target <= 1)"
    assert result.as_json()["marks"] == {"provider down": 1.0, "provider up": 2.0}


def test_a_chart_without_the_failures_has_no_red(tmp_path: Path) -> None:
    """The red above comes from the failed bins, not the legend or the error-rate line
    at zero (the check above can fail)."""
    result = _outage()
    for slot in result.timeline:
        slot["ok"], slot["failed"] = 20, 0
    write_chart(result, tmp_path / "calm.png")
    rgb = assert_chart(tmp_path / "calm.png")
    assert red_pixels(rgb) < 5_000


def test_the_drill_command_writes_the_chart_with_png_and_beside_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _outage()
    _report("provider-outage", result, True, None, tmp_path / "given.png")
    assert_chart(tmp_path / "given.png")
    printed = capsys.readouterr()
    assert json.loads(printed.out)["marks"]["provider up"] == 2.0  # --json stdout stays JSON
    assert "chart:" in printed.err

    _report("provider-outage", result, True, tmp_path / "report.json")  # no --png
    assert json.loads((tmp_path / "report.json").read_text())["drill"] == "provider-outage"
    assert_chart(tmp_path / "report.png")

    # An --out that is itself .png is the JSON: a chart never overwrites it.
    _report("provider-outage", result, True, tmp_path / "odd.png")
    assert json.loads((tmp_path / "odd.png").read_text())["drill"] == "provider-outage"


def test_a_failed_drill_still_gets_its_chart_and_exits_1(tmp_path: Path) -> None:
    result = _outage()
    result.passed = False
    with pytest.raises(typer.Exit) as exit_:
        _report("provider-outage", result, False, None, tmp_path / "failed.png")
    assert exit_.value.exit_code == 1
    assert_chart(tmp_path / "failed.png")
