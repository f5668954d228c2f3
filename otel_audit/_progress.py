"""Progress for long-running commands, and output files that never end up partial.

``Progress`` draws one line on stderr (rate, percent, ETA) only when stderr is
a terminal, at most ten times a second, so piping or redirecting output stays
quiet and scripts see nothing extra. ``atomic_output`` writes to a temporary
file beside the target and renames it into place only when the block ends
without an exception: Ctrl-C (KeyboardInterrupt), a crash or a full disk leave
no partial file under the requested name. Neither is thread-safe; use one per
command.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, TextIO

from otel_audit.errors import ConfigError

_REDRAW = 0.1  # seconds between redraws: fast enough to feel live, cheap enough not to matter


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """A progress line on a terminal: ``label  42% [####....] 420,000/1,000,000 35,000/s ETA 0:00:16``."""

    def __init__(
        self,
        total: int | None = None,
        label: str = "",
        *,
        unit: str = "records",
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            try:
                enabled = self.stream.isatty()
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = bool(enabled)
        self.total = total
        self.label = label
        self.unit = unit
        self.done = 0
        self._started = time.monotonic()
        self._drawn = 0.0
        self._width = 0

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; redraws at most every 0.1 s."""
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._drawn >= _REDRAW:
            self._drawn = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        """The text of the progress line (also used by tests)."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        parts = [self.label] if self.label else []
        if self.total:
            frac = min(self.done / self.total, 1.0)
            filled = int(frac * 20)
            parts.append(f"{frac * 100:3.0f}% [{'#' * filled}{'.' * (20 - filled)}]")
            parts.append(f"{self.done:,}/{self.total:,} {self.unit}")
        else:
            parts.append(f"{self.done:,} {self.unit}")
        parts.append(f"{rate:,.0f}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {_fmt_duration(max(self.total - self.done, 0) / rate)}")
        else:
            parts.append(f"elapsed {_fmt_duration(elapsed)}")
        return "  ".join(parts)

    def _draw(self, now: float) -> None:
        text = self.line(now)
        pad = " " * max(self._width - len(text), 0)
        self._width = len(text)
        try:
            self.stream.write("\r" + text + pad)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False  # the terminal went away; the work goes on

    def close(self) -> None:
        """Draw the final state and end the line (nothing when not on a terminal)."""
        if not self.enabled:
            return
        self._draw(time.monotonic())
        try:
            self.stream.write("\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass
        self.enabled = False

    def __enter__(self) -> Progress:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# errno values that mean "the output cannot take more bytes": raised by a write
# inside the block, they are about the output file, not the caller's work.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _cannot_write(path: str, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot write {path!r}: {exc.strerror or exc}")


@contextmanager
def atomic_output(
    path: str | None, mode: str = "w", *, stdout: IO[Any] | None = None
) -> Iterator[IO[Any]]:
    """Yield a file to write; it appears at ``path`` only if the block succeeds.

    ``path`` None or ``-`` yields stdout (text mode) or its buffer (binary).
    A path that cannot be written (a directory, a missing folder, a full disk)
    raises ``ConfigError("cannot write 'PATH': reason")``, one line for the
    CLI, and the temporary file is removed whatever happens.
    """
    if path is None or path == "-":
        out = stdout if stdout is not None else sys.stdout
        yield out.buffer if "b" in mode and hasattr(out, "buffer") else out
        return
    if os.path.isdir(path):
        # Refuse before the caller does its work: os.replace would fail only at the end.
        raise ConfigError(f"cannot write {path!r}: {os.strerror(errno.EISDIR)}")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".otel-audit-", suffix=".part", dir=directory)
    except OSError as exc:
        raise _cannot_write(path, exc) from exc
    in_block = False
    try:
        if "b" in mode:
            fh: IO[Any] = os.fdopen(fd, "wb")
        else:
            fh = os.fdopen(fd, "w", encoding="utf-8", newline="")
        with fh:
            in_block = True
            yield fh
            in_block = False
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        # BaseException: KeyboardInterrupt and SystemExit must clean up too.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and (not in_block or exc.errno in _NO_ROOM):
            # Our own open/flush/fsync/close/rename, or a write the disk refused.
            raise _cannot_write(path, exc) from exc
        raise
