"""This process's listening sockets: found through /proc, their accept queues read, and taken out of the
listening state at shutdown (``serving.service``) or handed to the batch acceptor
(``serving.uvicorn_hooks``)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def listening_sockets(keep_ports: set[int]) -> Iterator[list[socket.socket]]:
    """This process's listening TCP sockets but those on ``keep_ports``, as duplicates closed on exit (each socket
    once, however many fds reach it), for ``accept_queue`` and ``stop_listening``: found once, so that the check
    that the accept queue is empty and the stop run microseconds apart, not the time of a walk over /proc. Linux;
    where /proc is missing, none."""
    found = find_listeners(keep_ports)
    try:
        yield found
    finally:
        for sock in found:
            sock.close()


def stop_listening(listeners: list[socket.socket]) -> int:
    """Take ``listeners`` (from ``listening_sockets``) out of the listening state, for every process that shares
    them, and return how many.

    BentoML's workers share one listening socket with the arbiter, which holds it open until it exits: when a
    worker's uvicorn stops accepting, the kernel still completes connections into the socket's backlog, where
    nobody accepts them, and resets them with the requests they carry when the arbiter exits (a client sees the
    connection reset after sending, and cannot tell whether the request ran: one per client in a shutdown
    under load). ``shutdown(SHUT_RD)`` on a listening socket resets the few connections still waiting and makes
    every later connect fail at once (refused: the request was never sent, a client may retry it elsewhere);
    call it right after ``accept_queue`` found none waiting."""
    for sock in listeners:
        # Linux stops the listener and may still answer ENOTCONN (a listening socket is not connected)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD)
    return len(listeners)


def accept_queue(listeners: list[socket.socket]) -> int:
    """Connections the kernel has completed but nobody has accepted yet on ``listeners`` (Linux reports a
    listener's accept queue as ``tcpi_unacked`` in ``TCP_INFO``)."""
    waiting = 0
    for sock in listeners:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_UNACKED + 4)
        waiting += int.from_bytes(info[TCP_INFO_UNACKED:TCP_INFO_UNACKED + 4], sys.byteorder)
    return waiting


TCP_INFO_UNACKED = 24  # offset of tcpi_unacked in struct tcp_info: 8 one-byte fields, then rto, ato, snd_mss, rcv_mss


def find_listeners(keep_ports: set[int]) -> list[socket.socket]:
    """Duplicates of this process's listening TCP sockets but those on ``keep_ports`` (the caller closes them)."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        return []
    found, seen = [], set()
    for fd in [int(entry.name) for entry in fds.iterdir()]:  # listed before any duplicate below is opened
        with contextlib.suppress(OSError):
            status = os.fstat(fd)
            if not stat.S_ISSOCK(status.st_mode) or status.st_ino in seen:  # a socket once, whatever its fds
                continue
            seen.add(status.st_ino)
            duplicate = os.dup(fd)
            try:
                sock = socket.socket(fileno=duplicate)
            except OSError:
                os.close(duplicate)
                continue
            try:
                listening = (sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6)
                             and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                             and sock.getsockname()[1] not in keep_ports)
            except OSError:
                listening = False
            if listening:
                found.append(sock)
            else:
                sock.close()
    return found


