"""How far a curate run is, for the person watching it.

Videos committed out of those to do, clips kept and filtered, hours of
video in and out, speed, an ETA, and where the workers' time goes (each
stage's share of the busy seconds the stages report). On a terminal it is a
live display (rich); in a log it is one line every `log.progress_every_s`.
Counts are of committed videos, so they never run ahead of what a reader
of the output can see.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from engine.curate.commits import RunTotals

log = logging.getLogger("reelsift")

MODES = ("auto", "live", "log", "off")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def busy_shares(stage_times: dict[str, dict[str, float]]) -> list[tuple[str, float]]:
    """(stage, share of all stages' busy seconds), largest first."""
    busy = {name: float(t.get("busy_s", 0.0)) for name, t in stage_times.items()}
    total = sum(busy.values())
    if total <= 0:
        return []
    return sorted(((name, s / total) for name, s in busy.items() if s > 0), key=lambda p: -p[1])


class ProgressReport:
    """One moment of the run: what the display and the log line show."""

    def __init__(self, totals: RunTotals, *, todo: int, in_flight: int, elapsed_s: float,
                 stage_times: dict[str, dict[str, float]]) -> None:
        self.totals, self.todo, self.in_flight, self.elapsed_s = totals, todo, in_flight, elapsed_s
        self.shares = busy_shares(stage_times)

    @property
    def videos_per_min(self) -> float:
        return self.totals.videos / self.elapsed_s * 60 if self.elapsed_s > 0 else 0.0

    @property
    def video_hours_per_hour(self) -> float:
        return self.totals.seconds_in / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        done = self.totals.videos
        if done == 0:
            return None
        return max(0.0, (self.todo - done) * self.elapsed_s / done)

    def busy_text(self, top: int = 6) -> str:
        return ", ".join(f"{name} {share:.0%}" for name, share in self.shares[:top]) or "--"

    def line(self) -> str:
        t = self.totals
        failed = f" ({t.videos_failed} failed)" if t.videos_failed else ""
        errors = f", {t.clip_errors} clip errors" if t.clip_errors else ""
        return (f"progress: {t.videos}/{self.todo} videos{failed}, {self.in_flight} in flight; "
                f"clips {t.clips_passed} kept, {t.clips_filtered} filtered{errors}; "
                f"{t.seconds_in / 3600:.2f} h in -> {t.seconds_out / 3600:.2f} h out; "
                f"{self.videos_per_min:.1f} videos/min, {self.video_hours_per_hour:.1f} h of video/h; "
                f"elapsed {_duration(self.elapsed_s)}, ETA {_duration(self.eta_s)}; busy: {self.busy_text()}")

    def renderable(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        t = self.totals
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=max(1, self.todo), completed=t.videos, width=40),
                    f"{t.videos}/{self.todo} videos" + (f" ({t.videos_failed} failed)" if t.videos_failed else "")
                    + f", {self.in_flight} in flight")
        grid.add_row("curate", bar)
        grid.add_row("clips", f"{t.clips_passed} kept, {t.clips_filtered} filtered"
                      + (f", {t.clip_errors} errors" if t.clip_errors else ""))
        grid.add_row("hours", f"{t.seconds_in / 3600:.2f} in -> {t.seconds_out / 3600:.2f} out")
        grid.add_row("speed", f"{self.videos_per_min:.1f} videos/min, {self.video_hours_per_hour:.1f} h of video/h")
        grid.add_row("time", f"elapsed {_duration(self.elapsed_s)}, ETA {_duration(self.eta_s)}")
        grid.add_row("busy", self.busy_text())
        return grid


class RunProgress:
    """Shows `ProgressReport`s as the run goes: `update()` is called on every
    turn of the commit loop (about every second) and decides itself when to
    draw, so the loop stays unaware of terminals and log cadence."""

    def __init__(self, *, todo: int, mode: str, every_s: float, stage_times: Callable[[], dict[str, Any]],
                 stream: Any = None) -> None:
        if mode not in MODES:
            raise ValueError(f"log.progress must be one of {MODES}, got {mode!r}")
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "live" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode, self.todo, self.every_s = mode, todo, float(every_s)
        self.stage_times = stage_times
        self.started = time.perf_counter()
        self._last_line = self.started
        self._last_times = self.started - 60.0
        self._times: dict[str, Any] = {}
        self._live: Any = None

    def _report(self, totals: RunTotals, in_flight: int, *, fresh_times: float) -> ProgressReport:
        now = time.perf_counter()
        if now - self._last_times >= fresh_times:
            self._times = self.stage_times()
            self._last_times = now
        return ProgressReport(totals, todo=self.todo, in_flight=in_flight, elapsed_s=now - self.started,
                              stage_times=self._times)

    def update(self, totals: RunTotals, in_flight: int) -> None:
        if self.mode == "live" and self._live is not None:
            self._live.update(self._report(totals, in_flight, fresh_times=2.0).renderable())
        elif self.mode == "log" and time.perf_counter() - self._last_line >= self.every_s:
            self._last_line = time.perf_counter()
            log.info("%s", self._report(totals, in_flight, fresh_times=0.0).line())

    def finish(self, totals: RunTotals) -> None:
        """The last state, once: the display's final frame, or a last line."""
        report = self._report(totals, 0, fresh_times=0.0)
        if self.mode == "live" and self._live is not None:
            self._live.update(report.renderable())
        elif self.mode == "log":
            log.info("%s", report.line())

    @contextmanager
    def shown(self) -> Iterator[RunProgress]:
        """While inside, a live display holds the bottom of the terminal, and
        log records print above it rather than through it."""
        if self.mode != "live":
            yield self
            return
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.stream)
        live = Live(console=console, refresh_per_second=2, transient=False, redirect_stdout=True,
                    redirect_stderr=True)
        real = {id(sys.stdout): "stdout", id(sys.stderr): "stderr"}
        with live:
            # Hydra's console handler holds the real sys.stdout: pointed at
            # rich's proxies, records print above the display, not through it.
            moved = _log_handlers_to(real)
            self._live = live
            try:
                yield self
            finally:
                self._live = None
                for handler, stream in moved:
                    handler.setStream(stream)


def _log_handlers_to(real: dict[int, str]) -> list[tuple[logging.StreamHandler, Any]]:
    """Point the stream handlers writing to the real stdout / stderr (`real`:
    id -> name) at what sys.stdout / sys.stderr are now (rich's proxies);
    returns what to restore."""
    moved = []
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]  # Ray's loggers have their own handlers
    for logger in loggers:
        for handler in logger.handlers:
            name = real.get(id(getattr(handler, "stream", None)))
            if isinstance(handler, logging.StreamHandler) and name:
                moved.append((handler, handler.setStream(getattr(sys, name))))
    return moved
