"""Progress lines for logs: what a person reading a batch job's stderr sees."""

from __future__ import annotations

import io

from featurecache.progress import Progress


class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_a_log_gets_lines_with_counts_rate_eta_and_the_current_item():
    log = _Log()
    with Progress(10, "fit-head", unit="heads", every=0.0, prefix="[rank 0/2] ", stream=log) as progress:
        progress.update(4, current="svm:C=1")
    line = log.getvalue().strip().splitlines()[-1]
    assert line.startswith("[rank 0/2] fit-head: 4/10 heads (40%), ")
    assert "heads/s" in line and "elapsed, ETA " in line and line.endswith("; now: svm:C=1")


def test_no_line_before_the_interval_and_none_when_disabled():
    quiet, off = _Log(), _Log()
    with Progress(10, "extract", unit="images", every=3600.0, stream=quiet) as progress:
        progress.update(10)
    with Progress(10, "extract", unit="images", every=0.0, enabled=False, stream=off) as progress:
        progress.update(10)
    assert quiet.getvalue() == "" and off.getvalue() == ""


def test_a_resumed_job_counts_its_earlier_work_but_not_in_the_rate():
    log = _Log()
    with Progress(100, "extract", unit="images", initial=90, every=0.0, stream=log) as progress:
        progress.update(5)
    assert "95/100 images (95%)" in log.getvalue()


def test_the_heartbeat_logs_while_one_long_step_runs():
    import threading

    log = _Log()
    done = threading.Event()
    with Progress(3, "fit-head", unit="fits", every=0.0, stream=log) as progress, progress.heartbeat(interval=0.01):
        progress.set_current("svm:C=10")
        for _ in range(500):  # at most 5 s; no update() at all: only the heartbeat can write
            if log.getvalue():
                break
            done.wait(0.01)
    assert "fit-head: 0/3 fits" in log.getvalue() and "now: svm:C=10" in log.getvalue()
