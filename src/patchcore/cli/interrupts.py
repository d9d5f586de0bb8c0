"""Prompt, clean stops of a command on SIGINT (Ctrl-C) and SIGTERM (``kill``, a job scheduler).

Left to Python, the two signals behave badly for a long command:

* SIGINT raises ``KeyboardInterrupt`` only if it was not ignored when the process started, and a
  script's background job (``patchcore fit ... &`` in a non-interactive shell, many CI runners)
  starts with it ignored: such a fit shrugs Ctrl-C and ``kill -INT`` off and runs to its end.
* SIGTERM ends the process on the spot: no message, no ``finally`` blocks, nothing tidied.

:class:`StopOnSignals` turns both into :class:`Interrupted` (a ``KeyboardInterrupt``), so the
command unwinds through its ``with`` and ``finally`` blocks; :meth:`StopOnSignals.finish` then says
so in one line on stderr and ends the process with 128 + the signal number (130, 143) without
waiting for the interpreter's teardown (a second or more with torch loaded). Should the main thread
not unwind within :data:`GRACE_SECONDS` (busy in C code that does not return to Python), a watchdog
thread removes the temporary files being written and ends the process itself; a second signal does
that at once.

Temporary files: every file patchcore writes under a temporary name is listed in
:data:`patchcore.engine.atomic_files.PENDING_TEMPORARY` while it is written (model saves,
``scores.csv`` rewrites, overlays, evaluation summaries); a stop removes whatever is listed there.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import CodeType, FrameType, TracebackType
from typing import NoReturn

#: The signals that stop a command cleanly.
SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Seconds the main thread has to unwind after a signal before the watchdog ends the process.
GRACE_SECONDS = 1.5
#: Seconds after which a process that even the watchdog could not end (C code holding the
#: interpreter lock) is ended from C by :mod:`faulthandler`, with status 1.
HARD_STOP_SECONDS = 3.0


class Interrupted(KeyboardInterrupt):
    """The command was stopped by ``signum``; raised in the main thread by the signal handler."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


def signal_name(signum: int) -> str:
    """``SIGINT``, ``SIGTERM``, ... (the number where the platform has no name for it)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_status(signum: int) -> int:
    """The shell's status of a process ended by ``signum``: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


def stop_message(signum: int, command: str) -> str:
    """The one line a stopped command prints on stderr."""
    return f"interrupted ({signal_name(signum)}): {command} stopped"


def pending_temporary_files() -> list[Path]:
    """Every path being written under a temporary name (:mod:`patchcore.engine.atomic_files`)."""
    from ..engine.atomic_files import PENDING_TEMPORARY

    return list(tuple(PENDING_TEMPORARY))  # tuple(): one step, safe beside the main thread


def remove_pending_temporary_files() -> list[Path]:
    """Remove the files of :func:`pending_temporary_files`; returns those removed."""
    removed = []
    for path in pending_temporary_files():
        try:
            path.unlink()
        except OSError:  # gone already (renamed into place, or removed by its writer), or not ours to remove
            continue
        removed.append(path)
    return removed


class LineTrackingStream:
    """A text stream that passes everything on to ``stream`` and remembers whether the last text
    written ended its line: a progress bar redraws itself after a carriage return and leaves its
    line open, and a message written then must start on a line of its own."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:  # before writing: a signal may arrive between the write and the next line
            self.at_line_start = text.endswith("\n")
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


class StopOnSignals:
    """While active (a context manager, in the main thread), SIGINT and SIGTERM raise
    :class:`Interrupted` in the main thread; the handlers before are restored on exit.
    ``sys.stderr`` is meanwhile a :class:`LineTrackingStream` over itself.

    ``command`` names what stops in the message (``patchcore fit``). ``grace``: seconds the
    main thread has to unwind before the watchdog ends the process.
    """

    def __init__(self, command: str, grace: float = GRACE_SECONDS, hard_stop: float = HARD_STOP_SECONDS) -> None:
        self.command = command
        self.grace = grace
        self.hard_stop = hard_stop
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._unwound = threading.Event()
        self._exiting = threading.Lock()
        self._hard_stop_fd: int | None = None
        self._stderr: LineTrackingStream | None = None
        self._raise_again = False
        self._previous_hook = None
        self._hook = self._on_unraisable  # one bound method, so that release() can tell it is still ours

    # -- installing --------------------------------------------------------------------------

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
            if sys.stderr is not None:
                self._stderr = sys.stderr = LineTrackingStream(sys.stderr)
            self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._hook
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()
        self._unwound.set()
        self._cancel_hard_stop()

    def release(self) -> None:
        """Put back the handlers that were there before (for a command that handles signals itself)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._stderr is not None and sys.stderr is self._stderr:
            sys.stderr = self._stderr.stream
        self._stderr = None
        if self._previous_hook is not None and sys.unraisablehook is self._hook:
            sys.unraisablehook = self._previous_hook
        self._previous_hook = None

    # -- a signal arrives --------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._unwound.is_set():  # finish() is ending the process: nothing to raise any more
            return
        if self._raise_again:  # from _raise_again_later: the first one was swallowed
            self._raise_again = False
            raise Interrupted(signum)
        if self.signum is not None:  # a second signal while unwinding: stop now (unless finish() is at it)
            self.force_exit()
            return
        self.signum = signum
        threading.Thread(target=self._watchdog, name="patchcore-stop-watchdog", daemon=True).start()
        self._arm_hard_stop()
        raise Interrupted(signum)

    def _on_unraisable(self, unraisable) -> None:
        """``sys.unraisablehook``: where the signal landed in a finaliser (``__del__``, a generator
        closed as it is freed, a weakref callback), Python only reports the exception and carries
        on. Ours is not reported but raised again, at the main thread's next step."""
        if isinstance(unraisable.exc_value, Interrupted) and self.signum is not None:
            threading.Thread(target=self._raise_again_later, name="patchcore-stop-again", daemon=True).start()
        elif self._previous_hook is not None:
            self._previous_hook(unraisable)

    def _raise_again_later(self) -> None:
        """Once the main thread has left the hook (an exception raised inside it would be swallowed
        too), run the signal handler there once more, as a signal would, to raise the stop."""
        main = threading.main_thread().ident
        while not self._unwound.is_set():
            frame = sys._current_frames().get(main)
            if frame is None or not _runs(frame, StopOnSignals._on_unraisable.__code__):
                self._raise_again = True
                if hasattr(signal, "pthread_kill"):  # a real signal: it also ends a wait in a system call
                    signal.pthread_kill(main, self.signum)
                else:
                    _thread.interrupt_main(self.signum)
                return
            time.sleep(0.001)

    def _watchdog(self) -> None:
        if not self._unwound.wait(self.grace):
            self.force_exit()

    def _arm_hard_stop(self) -> None:
        """A stop from C for when no Python thread can run (the watchdog needs the interpreter lock)."""
        try:
            self._hard_stop_fd = os.open(os.devnull, os.O_WRONLY)  # the traceback it dumps is not for the user
            faulthandler.dump_traceback_later(self.hard_stop, exit=True, file=self._hard_stop_fd)
        except (OSError, RuntimeError, ValueError):
            self._cancel_hard_stop()

    def _cancel_hard_stop(self) -> None:
        if self._hard_stop_fd is not None:
            faulthandler.cancel_dump_traceback_later()
            os.close(self._hard_stop_fd)
            self._hard_stop_fd = None

    # -- ending the process ------------------------------------------------------------------

    @property
    def status(self) -> int:
        """Exit status for the signal received (130 when none was, as for Ctrl-C)."""
        return exit_status(self.signum if self.signum is not None else signal.SIGINT)

    def finish(self) -> NoReturn:
        """Called in the main thread once the command has unwound: remove what a cut-off write
        left, print the message, and end the process now, with :attr:`status`.

        Exit functions (``atexit``) still run; the interpreter's own teardown, which only frees
        memory and takes a second or more with torch loaded, is skipped.
        """
        self._unwound.set()
        with self._exiting:
            remove_pending_temporary_files()
            _close_progress_bars()
            _write_stderr(self._fresh_line() + stop_message(self.signum or signal.SIGINT, self.command) + "\n")
            _flush_standard_streams()
            with contextlib.suppress(BaseException):  # an exit function failing must not keep the process alive
                atexit._run_exitfuncs()
            _flush_standard_streams()
            os._exit(self.status)

    def force_exit(self) -> None:
        """End the process from any thread without unwinding: remove the temporary files being
        written, print the message, exit with :attr:`status`. Returns only when :meth:`finish`
        is ending the process already."""
        if not self._exiting.acquire(blocking=False):
            return  # the main thread is ending it already
        remove_pending_temporary_files()
        # The main thread may be inside a write to stderr: write past its buffer, never flush it.
        _write_stderr(self._fresh_line() + stop_message(self.signum or signal.SIGINT, self.command) + " (forced)\n",
                      flush_first=False)
        os._exit(self.status)

    def _fresh_line(self) -> str:
        """A line end when the last text on stderr left its line open (a progress bar), else nothing."""
        return "" if self._stderr is None or self._stderr.at_line_start else "\n"


def _runs(frame: FrameType, code: CodeType) -> bool:
    """Whether ``code`` is running in ``frame`` or in one of its callers."""
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _write_stderr(text: str, flush_first: bool = True) -> None:
    """Write straight to file descriptor 2 (after what Python's stderr holds, with ``flush_first``)."""
    if flush_first:
        _flush(sys.stderr)
    with contextlib.suppress(OSError):  # no stderr left to tell: stop all the same
        os.write(2, text.encode("utf-8", "replace"))


def _flush_standard_streams() -> None:
    _flush(sys.stdout)
    _flush(sys.stderr)


def _flush(stream) -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):  # closed, gone, or a broken pipe
        stream.flush()


def _close_progress_bars() -> None:
    """Close the progress bars left open by the unwinding, so that the message gets its own line."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return
    for bar in list(getattr(std.tqdm, "_instances", ())):
        with contextlib.suppress(Exception):  # a bar that cannot redraw is no reason not to stop
            bar.close()
