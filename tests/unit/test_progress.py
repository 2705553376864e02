"""The one progress line of cp, stage and get (directfs.commands.progress): a tqdm bar only on a terminal, notices
on lines of their own, and nothing but the notices elsewhere."""

from __future__ import annotations

import io
import re
import time

from directfs.commands.progress import REFRESH_INTERVAL_SECONDS, Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_shows_bytes_files_and_the_rate_and_redraws_at_most_every_interval() -> None:
    screen = FakeTerminal()
    progress = Progress("cp", files=2, total_bytes=3_000_000, stream=screen)
    assert progress.enabled
    drawn = screen.getvalue()
    assert "cp:   0%" in drawn and "0/2 files" in drawn
    progress.advance(1_000_000)
    assert screen.getvalue() == drawn  # within the refresh interval of the first draw: not drawn again
    time.sleep(REFRESH_INTERVAL_SECONDS + 0.05)
    progress.file_done()  # the interval is over: the count is drawn without waiting for more bytes
    assert screen.getvalue().endswith("1/2 files]")
    progress.advance(2_000_000)
    progress.file_done()
    progress.finish()
    final = screen.getvalue().rsplit("\r", 1)[-1]
    assert final.endswith("\n")
    assert "100%" in final and "3.00MB/3.00MB" in final and "2/2 files" in final
    # The average of the whole run: 3 MB in at least 0.3 s and (on any machine) less than 3 s.
    assert re.search(r"\d+(\.\d+)?MB/s", final), final
    progress.finish()  # idempotent: nothing drawn twice
    assert screen.getvalue().rsplit("\r", 1)[-1] == final


def test_a_notice_gets_a_line_of_its_own_and_the_bar_is_drawn_again_below_it() -> None:
    screen = FakeTerminal()
    with Progress("get", total_bytes=None, stream=screen) as progress:
        progress.total_bytes = 5_000
        progress.advance(2_000)
        progress.message("stream stopped (boom); resuming at byte 2000 (1)")
        after = screen.getvalue().split("directfs get: stream stopped (boom); resuming at byte 2000 (1)\n")
        assert len(after) == 2
        assert after[0].endswith("\r")  # the bar was cleared first: the notice starts its line
        assert "2.00kB/5.00kB" in after[1]  # and the bar is back below it
        assert "files" not in after[1]  # get counts no files
    assert screen.getvalue().endswith("\n")  # the with block drew the final line


def test_a_line_on_another_stream_is_flushed_before_the_bar_comes_back() -> None:
    screen, out = FakeTerminal(), io.StringIO()
    progress = Progress("stage", files=1, total_bytes=10, stream=screen)
    progress.line("ready /mnt/a", file=out)
    progress.finish()
    assert out.getvalue() == "ready /mnt/a\n"


def test_not_a_terminal_writes_only_the_notices_exactly() -> None:
    for stream, enabled in ((io.StringIO(), None), (FakeTerminal(), False)):
        progress = Progress("cp", files=3, total_bytes=30, stream=stream, enabled=enabled)
        assert not progress.enabled
        progress.advance(10)
        progress.message("s3://b/x: Input/output error")
        progress.file_done()
        time.sleep(REFRESH_INTERVAL_SECONDS + 0.05)
        progress.advance(20)
        progress.finish()
        assert stream.getvalue() == "directfs cp: s3://b/x: Input/output error\n"
    out = io.StringIO()
    quiet = Progress("stage", files=1, total_bytes=1, stream=io.StringIO())
    quiet.line("failed x: No such file or directory", file=out)
    assert out.getvalue() == "failed x: No such file or directory\n"


def test_quiet_draws_no_bar_on_a_terminal_and_keeps_the_notices() -> None:
    screen = FakeTerminal()
    progress = Progress("cp", files=1, total_bytes=10, stream=screen, quiet=True)
    assert not progress.enabled
    progress.advance(10)
    progress.message("s3://b/x: Input/output error")
    progress.file_done()
    progress.finish()
    assert screen.getvalue() == "directfs cp: s3://b/x: Input/output error\n"
    assert not Progress("cp", total_bytes=1, stream=FakeTerminal(), enabled=True, quiet=True).enabled
