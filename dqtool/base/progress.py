"""Progress of long work (teacher targets, eval generation, export, bench), one helper.

On a terminal (stderr is a TTY) a tqdm bar; otherwise (CI logs, ``nohup``, pipes) plain
lines, at most one every ``DQTOOL_PROGRESS_SECONDS`` (default 30) plus a final one, instead
of carriage-return bars that turn into one enormous line:

    teacher targets: 1,024/4,800 rows (21%), 41 s, ~150 s left

``DQTOOL_PROGRESS=0`` silences it; in a multi-process run only the main process reports.

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> with Progress(3, "demo", unit="rows", stream=out, interval=0) as p:
    ...     p.update(2); p.update(1)
    >>> print(out.getvalue().splitlines()[-1].split(",")[0])
    demo: 3/3 rows (100%)
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def enabled() -> bool:
    """Whether progress is shown here (``DQTOOL_PROGRESS`` not 0, main process)."""
    return os.environ.get("DQTOOL_PROGRESS", "1") != "0" and _main_process()


def interval() -> float:
    """Seconds between plain progress lines (``DQTOOL_PROGRESS_SECONDS``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("DQTOOL_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


def is_tty(stream: TextIO | None = None) -> bool:
    s = stream if stream is not None else sys.stderr
    return bool(getattr(s, "isatty", lambda: False)())


def _num(n: float) -> str:
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.1f}"


class Progress:
    """``total`` units of work named ``desc``; call :meth:`update` as they finish.

    A tqdm bar on a TTY, else a plain line every ``interval`` seconds (and one at the end,
    with the elapsed time). ``total=None``: counts without a percentage.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", stream: TextIO | None = None,
                 interval: float | None = None, show: bool | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = globals()["interval"]() if interval is None else interval
        self.show = enabled() if show is None else show
        self.n = 0
        self.start = self._last = time.time()
        self._bar = None
        self._closed = False
        if self.show and stream is None and is_tty(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=self.stream, dynamic_ncols=True)

    def _line(self, final: bool = False) -> str:
        el = time.time() - self.start
        s = f"{self.desc}: {_num(self.n)}"
        if self.total:
            s += f"/{_num(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            s += f" {self.unit}"
        s += f", {el:.0f} s"
        if not final and self.total and self.n:
            s += f", ~{el / self.n * (self.total - self.n):.0f} s left"
        return s

    def update(self, n: float = 1) -> None:
        self.n += n
        if not self.show:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.time()
        if now - self._last >= self.interval and not (self.total and self.n >= self.total):
            self._last = now
            print(self._line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.show:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            print(self._line(final=True), file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], total: int | None, desc: str, unit: str = "it", **kw) -> Iterator[T]:
    """Iterate ``items`` reporting one unit per item.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> list(track([1, 2], 2, "x", stream=out, interval=0, show=True))
        [1, 2]
        >>> out.getvalue().splitlines()[-1].startswith("x: 2/2 it (100%)")
        True
    """
    with Progress(total, desc, unit, **kw) as p:
        for item in items:
            yield item
            p.update(1)


def stage(desc: str, stream: TextIO | None = None):
    """A context manager printing ``desc ...`` then ``desc: done in N s`` (for steps that
    report no count, e.g. optimum's export), on the main process unless silenced.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> with stage("export: graphs", stream=out): pass
        >>> out.getvalue().splitlines()[0]
        'export: graphs ...'
    """
    from contextlib import contextmanager

    @contextmanager
    def _cm():
        s = stream if stream is not None else sys.stderr
        show = enabled() or stream is not None
        t0 = time.time()
        if show:
            print(f"{desc} ...", file=s, flush=True)
        yield
        if show:
            print(f"{desc}: done in {time.time() - t0:.0f} s", file=s, flush=True)

    return _cm()
