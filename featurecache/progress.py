"""Progress that a person or a log can follow, the same for every stage.

On a terminal, :class:`Progress` is a tqdm bar with the elapsed time and an ETA. When
stderr is not a terminal (a log file, a batch job, ``--json``), it writes a plain line
at least every ``every`` seconds instead: done of total, the rate, elapsed time, ETA and
what is being worked on. Short jobs print nothing, and nothing is written to stdout.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

LOG_EVERY = 30.0  # seconds between two log lines


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Counts work done of ``total`` (``unit``s) for one stage; a context manager.

    ``enabled=False`` shows nothing (library calls, tests). ``prefix`` starts every log
    line (e.g. ``[rank 1/4] ``). ``initial`` counts work done before this process started
    (a resumed run); the rate and ETA count only this process's work.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 every: float = LOG_EVERY, prefix: str = "", stream=None):
        self.total, self.desc, self.unit, self.prefix = int(total), desc, unit, prefix
        self.done = self.initial = int(initial)
        self.every = every
        self.current = ""
        self.stream = stream if stream is not None else sys.stderr
        self.started = self.last = time.monotonic()
        self.bar = None
        self.enabled = enabled
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=unit, leave=False,
                            dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, current: str | None = None) -> None:
        """``n`` more units done; ``current`` names what is worked on now."""
        self.done += n
        if current is not None:
            self.set_current(current)
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.every:
            self.log()

    def add_total(self, n: int) -> None:
        """``n`` more units to do than planned (work added on the way)."""
        self.total += int(n)
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def set_current(self, current: str) -> None:
        self.current = current
        if self.bar is not None:
            self.bar.set_postfix_str(current, refresh=False)

    def line(self) -> str:
        """``extract: 1200/3068 images (39%), 85.2 images/s, 0:14 elapsed, ETA 0:22; now: ...``"""
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 else "?"
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = (f"{self.prefix}{self.desc}: {self.done}/{self.total} {self.unit}{share}, "
                f"{rate:.1f} {self.unit}/s, {_duration(elapsed)} elapsed, ETA {eta}")
        return text + (f"; now: {self.current}" if self.current else "")

    def log(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last = time.monotonic()

    @contextlib.contextmanager
    def heartbeat(self, interval: float = 1.0):
        """While the block runs, redraw the bar every ``interval`` seconds, or write a log line at
        least every ``every`` seconds, also while no unit finishes (one long fit or batch), so that
        the elapsed time and the ETA keep moving."""
        stop = threading.Event()

        def beat():
            while not stop.wait(interval):
                if self.bar is not None:
                    self.bar.refresh()
                elif self.enabled and time.monotonic() - self.last >= self.every:
                    self.log()

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
