"""The listening sockets' helpers: stop_listening (the end of a shutdown's drain) and accept_queue."""

import os
import socket

import pytest


def test_stop_listening_refuses_new_connections_at_once_on_every_listener_but_the_kept():
    """The end of the drain: a listening socket (as BentoML's, shared with the arbiter, which keeps it open) stops
    taking connections, so a client's connect is refused instead of queued unaccepted and reset with its request
    when the server exits; a kept port (gRPC's, which stops on its own) still listens."""
    from serving.listeners import listening_sockets, stop_listening

    with socket.create_server(("127.0.0.1", 0)) as http, socket.create_server(("127.0.0.1", 0)) as grpc_like:
        kept = grpc_like.getsockname()[1]
        second_fd = os.dup(http.fileno())  # a worker reaches BentoML's listener through more than one fd
        try:
            with listening_sockets(keep_ports={kept}) as listeners:
                assert stop_listening(listeners) == 1
                assert stop_listening(listeners) == 1  # again: no error
            with listening_sockets(keep_ports={kept}) as listeners:  # the other worker, after this one
                assert stop_listening(listeners) == 0
        finally:
            os.close(second_fd)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(http.getsockname(), timeout=2)
        socket.create_connection(("127.0.0.1", kept), timeout=2).close()


def test_accept_queue_counts_connections_completed_but_not_accepted_on_all_but_the_kept_listeners():
    """What the end of the drain waits on before it stops the listener: a connection the kernel completed but no
    worker accepted yet would be reset, with its request, by the stop. Counted on the sockets found once, so that
    the last count and the stop are microseconds apart."""
    from serving.listeners import accept_queue, listening_sockets

    with socket.create_server(("127.0.0.1", 0)) as http, socket.create_server(("127.0.0.1", 0)) as grpc_like:
        kept = grpc_like.getsockname()[1]
        with listening_sockets(keep_ports={kept}) as listeners:
            baseline = accept_queue(listeners)  # other listeners of this process (none, in a plain run)
            clients = [socket.create_connection(http.getsockname(), timeout=2) for _ in range(2)]
            kept_client = socket.create_connection(("127.0.0.1", kept), timeout=2)
            assert accept_queue(listeners) == baseline + 2
            http.accept()[0].close()
            assert accept_queue(listeners) == baseline + 1
        for c in (*clients, kept_client):
            c.close()


