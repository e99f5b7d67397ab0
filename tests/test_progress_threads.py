"""exme.progress (plain lines off a terminal, cursor restored on SIGTERM) and exme.threads (the default)."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from exme.errors import ExmeError
from exme.progress import Progress, format_seconds
from exme.threads import default_threads, resolve_threads


def test_plain_mode_prints_one_line_per_finished_unit_with_an_eta():
    stream = io.StringIO()
    with Progress(stream=stream, terminal=False) as progress:
        bar = progress.bar("alpha ckpt-1", total=3)
        for i in range(3):
            bar.advance(info=f"best 0.{i}")
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[:2] for line in lines] == [["alpha ckpt-1", "1/3"], ["alpha ckpt-1", "2/3"], ["alpha ckpt-1", "3/3"]]
    assert "eta " in lines[0] and "eta " not in lines[2]  # the finished bar has no ETA
    assert lines[1].endswith("best 0.1")


def test_plain_mode_throttles_fast_units_but_always_prints_the_last():
    stream = io.StringIO()
    with Progress(stream=stream, terminal=False) as progress:
        bar = progress.bar("items", total=50, min_interval=3600)
        for _ in range(50):
            bar.advance()
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[1] for line in lines] == ["1/50", "50/50"]


def test_close_prints_the_count_reached_when_a_bar_stops_early():
    stream = io.StringIO()
    with Progress(stream=stream, terminal=False) as progress:
        bar = progress.bar("items", total=10, min_interval=3600)
        for _ in range(4):
            bar.advance()
        bar.close()
    assert [line.split("  ")[1] for line in stream.getvalue().splitlines()] == ["1/10", "4/10"]


def test_eta_is_the_mean_pace_times_the_units_left(monkeypatch):
    import exme.progress as progress_module

    clock = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    progress = Progress(enabled=False)
    bar = progress.bar("x", total=10)
    clock[0] = 112.0
    bar.advance(4)  # 3 s per unit, 6 left
    assert bar.eta() == pytest.approx(18.0)
    assert format_seconds(bar.eta()) == "0:18" and format_seconds(3725) == "1:02:05" and format_seconds(None) == "?"


def test_disabled_progress_prints_nothing():
    stream = io.StringIO()
    with Progress(enabled=False, stream=stream) as progress:
        progress.bar("x", total=2).advance()
    assert stream.getvalue() == ""


def test_sigterm_during_a_live_display_restores_the_cursor_and_exits_143(tmp_path):
    script = textwrap.dedent(
        """
        import sys, time
        from exme.progress import Progress
        with Progress(stream=sys.stdout, terminal=True) as progress:
            bar = progress.bar("work", total=100)
            print("started", file=sys.__stderr__, flush=True)  # rich redirects sys.stderr while live
            while True:
                bar.advance()
                time.sleep(0.05)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr.readline().strip() == b"started"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143
    hide, show = b"\x1b[?25l", b"\x1b[?25h"
    assert hide in out and out.rindex(show) > out.rindex(hide)


@pytest.mark.parametrize(
    "cpus, load, expected",
    [(2, 0.0, 2), (2, 1.0, 1), (2, 5.0, 1), (16, 0.3, 16), (16, 6.4, 10), (8, 7.6, 1)],
)
def test_default_threads_leave_out_the_cpus_other_processes_keep_busy(cpus, load, expected):
    assert default_threads(cpus=cpus, load=load) == expected


def test_resolve_threads_checks_the_value():
    assert resolve_threads(3) == 3 and resolve_threads("4") == 4
    assert resolve_threads("auto") == resolve_threads(None) >= 1
    for bad in (0, -2, "many", 1.5):
        with pytest.raises(ExmeError, match="--threads"):
            resolve_threads(bad)
