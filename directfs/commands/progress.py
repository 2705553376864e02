"""The progress line of ``directfs cp``, ``stage`` and ``get``: a tqdm bar on stderr, drawn only when stderr is a
terminal.

The bar shows the bytes done of the total with decimal prefixes (``MB`` and ``MB/s`` are 10^6 bytes, as before),
the percentage, the elapsed and remaining time, the rate (recent while running, the whole run's average on the final
line) and the files done of the total (``get``: its one file). A line of its own (an error, a resumed stream,
``stage``'s ``ready``/``failed``) goes through :meth:`Progress.message` or :meth:`Progress.line`, which clear the bar,
write the line and draw the bar again below it. When the stream is not a terminal, or the command was given
``-q``/``--quiet`` (each command's own flag, defined beside its other flags: importing this module loads tqdm, which
parsing must not), no bar is drawn and those lines are all that is written, byte for byte what the commands wrote
before the bar was tqdm's.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Final, TextIO

from tqdm import tqdm

# At most 4 redraws a second: smooth to the eye, and drawing (format, write, flush) stays negligible next to the
# transfer even when blocks land thousands of times a second.
REFRESH_INTERVAL_SECONDS: Final = 0.25
# tqdm's own layout with "B" after the byte counts (tqdm alone prints "12.3M/27.0M"); the file count is the postfix.
BAR_FORMAT: Final = (
    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)


class _Bar(tqdm):  # type: ignore[type-arg]  # a manual bar iterates nothing: tqdm's item type has no meaning here
    # No watchdog thread: tqdm's monitor only forces a redraw of bars whose miniters grew, and ours stays 0.
    monitor_interval = 0


class Progress:
    """One progress bar on ``stream`` (stderr by default), only when it is a terminal (or ``enabled`` says so) and
    not ``quiet`` (``--quiet``).

    ``advance`` counts bytes, ``file_done`` counts files (shown when ``files`` is given), ``finish`` draws the final
    line; used as a context manager, the bar is finished on every way out, so an error printed after it starts on a
    line of its own."""

    def __init__(
        self,
        command: str,
        *,
        total_bytes: int | None,
        files: int | None = None,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        quiet: bool = False,
    ) -> None:
        self.command = command
        self.stream = sys.stderr if stream is None else stream
        self.enabled = not quiet and (self.stream.isatty() if enabled is None else enabled)
        self.files = files
        self.files_done = 0
        self._started = time.monotonic()
        self._bar = _Bar(
            desc=command,
            total=total_bytes,
            file=self.stream,
            disable=not self.enabled,
            # Until finish(): a bar dropped on an exception (and closed by the garbage collector) clears itself
            # instead of drawing its line once more after the error message.
            leave=False,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,  # decimal MB, as MB/s is
            mininterval=REFRESH_INTERVAL_SECONDS,
            miniters=0,  # look at the clock on every advance (and file_done): a slow stream still redraws on time
            dynamic_ncols=True,  # follow a resized terminal
            bar_format=BAR_FORMAT,
            postfix=self._files_text(),
        )

    def _files_text(self) -> str:
        return f"{self.files_done}/{self.files} files" if self.files is not None else ""

    @property
    def total_bytes(self) -> int | None:
        total = self._bar.total
        return None if total is None else int(total)

    @total_bytes.setter
    def total_bytes(self, value: int | None) -> None:  # get learns the size when its first stream opens
        self._bar.total = value
        self._bar.refresh()

    def advance(self, count: int) -> None:
        self._bar.update(count)

    def file_done(self) -> None:
        self.files_done += 1
        self._bar.set_postfix_str(self._files_text(), refresh=False)
        self._bar.update(0)  # redraws if the last redraw is REFRESH_INTERVAL_SECONDS old

    def message(self, text: str) -> None:
        """``directfs COMMAND: text`` on a line of its own on the progress stream (an error, a notice)."""
        self._write(f"directfs {self.command}: {text}", self.stream)

    def line(self, text: str, file: TextIO | None = None) -> None:
        """``text`` on a line of its own on ``file`` (stdout by default) without breaking the bar."""
        self._write(text, sys.stdout if file is None else file)

    def _write(self, text: str, file: TextIO) -> None:
        if not self.enabled:
            file.write(f"{text}\n")
            file.flush()
            return
        # Clears the bar (also when file is stdout and the bar stderr: one terminal), writes, draws the bar again;
        # the flush comes before the redraw, or a buffered stdout would land after the bar.
        with tqdm.external_write_mode(file=file):
            file.write(f"{text}\n")
            file.flush()

    def finish(self) -> None:
        """The final line (the whole run's average rate) and a newline; idempotent."""
        self._bar.leave = True
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.finish()

    @property
    def elapsed_seconds(self) -> float:
        return time.monotonic() - self._started
