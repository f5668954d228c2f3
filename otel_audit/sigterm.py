"""Flush the audit pipelines when SIGTERM arrives and the application left it at its default.

Without otel-audit, SIGTERM ends a Python process at once: the kernel acts,
no Python code runs. With a Python handler installed, the process ends only
when the handler runs, and CPython runs handlers only on the main thread,
between bytecodes. A main thread blocked in a wait without a timeout
(``threading.Event().wait()``, ``thread.join()``) that the signal reaches
just before it blocks, or a signal the kernel hands to another thread, stays
unhandled until something else wakes that thread: the process would ignore
SIGTERM. So the handler is not the only trigger:

- The signal module writes each caught signal's number to the wakeup file
  descriptor from its C handler, in whichever thread the signal lands. When
  the application has not set a wakeup descriptor (asyncio and Trio do), ours
  is this pipe, and the flushing thread starts from there.
- The Python handler (main thread, when it runs) restores the default
  action and writes to the same pipe. It never flushes itself: it may have
  interrupted the main thread while it held a writer's lock.
- When the pipelines are shut down the thread ends the process with the
  default action. If the handler has not run yet, the thread signals the main
  thread itself (``pthread_kill``), which interrupts its wait and runs the
  handler, which now ends the process.

A forked child (``multiprocessing``) gets a pipe and a thread of its own:
its SIGTERM flushes its own writers and ends it, never its parent. SIGTERM
is blocked on the forking thread from before ``fork()`` until the child has
its pipe, so a child terminated as soon as it exists neither wakes the
parent's thread nor loses the signal. A child keeps no wakeup descriptor
(one that closes every descriptor, as daemons do, would have signal numbers
written into whatever file reuses the number), so it relies on the handler
alone; an application's own wakeup descriptor stays as it is.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Protocol

_log = logging.getLogger("otel_audit")

__all__ = ["handle_sigterm"]

_WAKE = b"T"  # written by the Python handler; the wakeup descriptor writes signal numbers


class _Pipeline(Protocol):
    def shutdown(self) -> None: ...


class _SigtermFlush:
    def __init__(self) -> None:
        self.pipelines: list[_Pipeline] = []
        self._wakeup = False  # the pipe is the signal module's wakeup descriptor
        self._fork_masks: dict[int, set[int | signal.Signals]] = {}  # forking thread -> its mask
        self._open()
        os.register_at_fork(
            before=self._before_fork,
            after_in_parent=self._restore_mask,
            after_in_child=self._after_fork,
        )

    def _open(self) -> None:
        self._pid = os.getpid()
        self._done = False  # the pipelines are shut down: the next SIGTERM ends the process
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        stat = os.fstat(self._write)
        self._identity = (stat.st_dev, stat.st_ino)
        threading.Thread(target=self._run, name="otel-audit-sigterm", daemon=True).start()

    def _ours(self) -> bool:
        """The pipe is still ours (a daemon closing every descriptor frees its number for reuse)."""
        try:
            stat = os.fstat(self._write)
        except OSError:
            return False
        return (stat.st_dev, stat.st_ino) == self._identity

    def install(self) -> None:
        """On the main thread: our handler, and our pipe as the wakeup descriptor if it is free."""
        signal.signal(signal.SIGTERM, self.handler)
        self._take_wakeup()

    def _take_wakeup(self) -> None:
        try:
            previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            return
        if previous != -1:  # the application's (asyncio, Trio): theirs stays
            signal.set_wakeup_fd(previous)
            return
        self._wakeup = True

    # A child must never wake the parent's thread, and must not lose a SIGTERM
    # sent as soon as it exists (multiprocessing's terminate() right after
    # start()): SIGTERM stays blocked on the forking thread from before fork()
    # until the child has its own pipe, then arrives there, pending.

    def _before_fork(self) -> None:
        if self._installed():
            ident = threading.get_ident()
            self._fork_masks[ident] = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def _restore_mask(self) -> None:
        mask = self._fork_masks.pop(threading.get_ident(), None)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _after_fork(self) -> None:
        try:
            if self._pid != os.getpid():
                self._reopen_in_child()
        finally:
            self._restore_mask()

    def _reopen_in_child(self) -> None:
        inherited = (self._read, self._write)
        if self._wakeup:
            # The child keeps no wakeup descriptor: it would still be the
            # parent's pipe, and a child that closes every descriptor (a daemon)
            # would have signal numbers written into whatever reuses the number.
            # An application's own descriptor, set since, stays.
            current = signal.set_wakeup_fd(-1)
            if current != inherited[1]:
                signal.set_wakeup_fd(current)
        self._wakeup = False
        self._open()
        for fd in inherited:
            try:
                os.close(fd)
            except OSError:
                pass

    def _installed(self) -> bool:
        return bool(signal.getsignal(signal.SIGTERM) == self.handler)

    def handler(self, signum: int, _frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        if self._done or self._pid != os.getpid() or not self._ours():
            os.kill(os.getpid(), signum)  # shut down already (or no pipe to wake): end now
            return
        try:
            os.write(self._write, _WAKE)
        except OSError:
            pass

    def _run(self) -> None:
        read = self._read
        while True:
            try:
                data = os.read(read, 64)
            except OSError:
                return
            if not data:
                return
            # A signal number from the wakeup descriptor counts while our handler
            # is installed (the application may have replaced it); our handler's
            # byte always counts.
            if _WAKE in data or (bytes([signal.SIGTERM]) in data and self._installed()):
                break
        for pipeline in list(self.pipelines):
            try:
                pipeline.shutdown()
            except Exception:
                _log.exception("otel-audit: shutdown on SIGTERM failed")
        self._done = True
        main = threading.main_thread().ident
        while True:
            if self._installed() and main is not None:
                # The handler has not run: wake the main thread with a signal of
                # its own; the handler sees _done and ends the process.
                signal.pthread_kill(main, signal.SIGTERM)
            else:
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)


_flush: _SigtermFlush | None = None


def handle_sigterm(pipeline: _Pipeline) -> None:
    """Shut ``pipeline`` down on SIGTERM when SIGTERM is still at its default (main thread only).

    Servers such as gunicorn install their own handlers and exit through
    atexit, which shuts the TracerProvider (and so the writer) down.
    """
    global _flush
    if threading.current_thread() is not threading.main_thread():
        return
    if _flush is not None and _flush._installed():
        _flush.pipelines.append(pipeline)
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    if _flush is None:
        _flush = _SigtermFlush()
    _flush.pipelines.append(pipeline)
    _flush.install()
