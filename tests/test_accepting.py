"""serving.accepting: a burst of new connections is taken in a few turns of a busy uvloop loop, not one per turn."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from serving.accepting import Acceptor

uvloop = pytest.importorskip("uvloop")

BURST = 200


async def turns_to_accept(with_acceptor: bool) -> tuple[int, Acceptor | None]:
    """Turns of the running loop until ``BURST`` connections, all completed by the kernel at once, are made."""
    loop = asyncio.get_running_loop()
    made: list[asyncio.BaseTransport] = []

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(transport)

    server = await loop.create_server(Protocol, "127.0.0.1", 0, backlog=2 * BURST)
    listener = server.sockets[0]
    acceptor = None
    if with_acceptor:
        acceptor = Acceptor(socket.socket(fileno=os.dup(listener.fileno())), Protocol)
        acceptor.start()
    clients = [socket.create_connection(listener.getsockname()[:2]) for _ in range(BURST)]  # the kernel's queue
    turns = 0
    while len(made) < BURST and turns < 10 * BURST:
        await asyncio.sleep(0)  # one turn of the loop
        turns += 1
    assert len(made) == BURST
    if acceptor is not None:  # a listener that stops listening (shutdown) stops the acceptor, quietly
        with socket.socket(fileno=os.dup(listener.fileno())) as same:  # (uvloop's own object refuses shutdown)
            same.shutdown(socket.SHUT_RD)
        for _ in range(5):
            await asyncio.sleep(0)
    for client in clients:
        client.close()
    for transport in made:
        transport.close()
    server.close()
    return turns, acceptor


def test_uvloop_alone_accepts_one_connection_per_turn() -> None:
    """The premise of serving.accepting: should uvloop start taking a batch per turn, the acceptor is not needed."""
    turns, _ = uvloop.run(turns_to_accept(with_acceptor=False))
    assert turns >= BURST // 2


def test_acceptor_takes_a_burst_in_a_few_turns_and_stops_with_the_listener() -> None:
    turns, acceptor = uvloop.run(turns_to_accept(with_acceptor=True))
    assert turns <= 3 * BURST // 64 + 3
    assert acceptor.accepted > BURST // 2
    assert acceptor.listener.fileno() == -1  # stopped and closed its duplicate
