"""Child processes that never outlive their parent.

``livectr run`` starts the broker and every stage in sessions of their own (so a terminal's
Ctrl-C reaches only the parent, which stops them in order). The price is that no signal to the
run's process group reaches them: if the parent dies without stopping them (SIGKILL, a crash),
they would run on as orphans. On Linux, :func:`die_with_parent` asks the kernel to send them a
signal when their parent dies (``PR_SET_PDEATHSIG``); elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    return getattr(libc, "prctl", None)


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when this process dies.

    ``None`` where the platform has no such thing (then pass no ``preexec_fn``). The pid is taken
    now, in the parent: if the parent is already gone by the time the child runs the hook (the
    race the man page warns about), the child exits at once.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return hook


#: Seconds a stage gets, after the first SIGINT/SIGTERM, to finish cleanly before it exits anyway.
STOP_GRACE_S = 7.0


def stop_on_signals(grace_s: float | None = None) -> threading.Event:
    """A stop event set by SIGINT/SIGTERM, with a bound on how long stopping may take.

    The first signal sets the event: the stage finishes its step, commits, writes its last
    snapshot and exits. Should that hang (a flush or a commit to a broker that is gone), the
    process exits ``grace_s`` later anyway (``$LIVECTR_STOP_GRACE_S``, default
    :data:`STOP_GRACE_S`); a second signal exits at once. Both are watched from a thread
    woken through :func:`signal.set_wakeup_fd`, so they work even while the main thread is
    blocked inside a C call that never returns to the interpreter. Call from the main thread.
    """
    if grace_s is None:
        grace_s = float(os.environ.get("LIVECTR_STOP_GRACE_S", STOP_GRACE_S))
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    # Keep the sockets alive as long as the process (the wakeup fd is only a number).
    _keep.extend((reader, writer))
    threading.Thread(target=_watch, args=(reader, stop, grace_s), name="stop-signals", daemon=True).start()
    return stop


_keep: list[socket.socket] = []


def _watch(reader: socket.socket, stop: threading.Event, grace_s: float) -> None:
    received = 0
    while True:
        data = reader.recv(64)
        if not data:
            return
        for signum in data:
            if signum not in (signal.SIGINT, signal.SIGTERM):
                continue
            received += 1
            name = signal.Signals(signum).name
            if received > 1:
                _exit_now(f"second {name}: exiting at once", 128 + signum)
            stop.set()
            timer = threading.Timer(
                grace_s, _exit_now, args=(f"still running {grace_s:g}s after {name}: exiting", 128 + signum)
            )
            timer.daemon = True
            timer.start()


def _exit_now(message: str, code: int) -> None:
    try:
        sys.stderr.write(f"livectr: {message}\n")
        sys.stderr.flush()
    finally:
        os._exit(code)
