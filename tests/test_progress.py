"""A curate run's progress: the numbers, the log line, the live display."""

from __future__ import annotations

import io
import logging

import pytest

from engine.curate.commits import RunTotals
from engine.curate.progress import ProgressReport, RunProgress, busy_shares

TIMES = {"probe": {"busy_s": 1.0}, "transcode": {"busy_s": 7.0}, "write": {"busy_s": 2.0}, "idle": {"busy_s": 0.0}}


def totals(**kw) -> RunTotals:
    return RunTotals(**{"videos": 4, "videos_failed": 1, "clips_passed": 30, "clips_filtered": 5, "clip_errors": 0,
                        "seconds_in": 7200.0, "seconds_out": 3600.0, **kw})


def test_report_speed_eta_and_busy_shares():
    report = ProgressReport(totals(), todo=10, in_flight=2, elapsed_s=120.0, stage_times=TIMES)
    assert report.videos_per_min == pytest.approx(2.0)
    assert report.video_hours_per_hour == pytest.approx(60.0)  # 2 h of video in 2 minutes
    assert report.eta_s == pytest.approx(180.0)  # 6 videos left at 2 per minute
    assert busy_shares(TIMES) == [("transcode", 0.7), ("write", 0.2), ("probe", 0.1)]
    line = report.line()
    assert line.startswith("progress: 4/10 videos (1 failed), 2 in flight; clips 30 kept, 5 filtered; ")
    assert "2.00 h in -> 1.00 h out" in line and "2.0 videos/min" in line and "60.0 h of video/h" in line
    assert "elapsed 2m00s, ETA 3m00s" in line and line.endswith("busy: transcode 70%, write 20%, probe 10%")
    assert "ETA --" in ProgressReport(totals(videos=0), todo=10, in_flight=1, elapsed_s=5.0, stage_times={}).line()


def test_log_mode_writes_a_line_every_interval_and_a_last_one(caplog):
    progress = RunProgress(todo=10, mode="auto", every_s=0.0, stage_times=lambda: TIMES, stream=io.StringIO())
    assert progress.mode == "log"  # not a terminal
    with caplog.at_level(logging.INFO, logger="reelsift"), progress.shown():
        progress.update(totals(), 2)
        progress.finish(totals(videos=10))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress: ")]
    assert len(lines) == 2 and lines[-1].startswith("progress: 10/10 videos") and "ETA 0m00s" in lines[-1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_mode_draws_the_display_on_a_terminal():
    screen = Terminal()
    progress = RunProgress(todo=10, mode="auto", every_s=30.0, stage_times=lambda: TIMES, stream=screen)
    assert progress.mode == "live"
    with progress.shown():
        progress.update(totals(), 2)
        logging.getLogger("reelsift").warning("a log record while the display is up")
        progress.finish(totals(videos=10))
    shown = screen.getvalue()
    for text in ("10/10 videos", "30 kept, 5 filtered", "2.00 in -> 1.00 out", "ETA 0m00s", "transcode 70%"):
        assert text in shown, text
    with pytest.raises(ValueError, match="log.progress must be one of"):
        RunProgress(todo=1, mode="fancy", every_s=1.0, stage_times=dict)
