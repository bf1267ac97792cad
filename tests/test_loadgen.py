"""The benchmarks' load generator does not stop itself to collect garbage while it sends."""

import gc
import weakref

import pytest

from benchmarks.loadgen import collector_paused


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_the_collector_is_off_while_a_load_runs_and_on_again_after():
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a load that fails")
    assert gc.isenabled()


def test_each_load_starts_with_the_garbage_of_the_last_one_collected():
    cycle = weakref.ref(Node())
    assert cycle() is not None  # nothing has collected it yet
    with collector_paused():
        assert cycle() is None


def test_the_soak_offers_a_fraction_of_what_an_even_mix_of_its_doors_can_take():
    from benchmarks.soak import even_mix_capacity

    assert even_mix_capacity([6000, 3000, 2000]) == pytest.approx(3000)  # 1/6 + 1/3 + 1/2 of a second at 1,000 each
    assert even_mix_capacity([5000, 5000]) == pytest.approx(5000)


def native_or_skip():
    from benchmarks.loadgen import native_generator

    try:
        return native_generator()
    except RuntimeError as exc:  # no C compiler or no libnghttp2-dev here: the Python generators still run
        pytest.skip(str(exc))


def test_the_native_generator_sends_on_schedule_and_reads_every_answer(tmp_path):
    # a small HTTP server answering 200 and 429 in turn, and closing a connection now and then as a worker
    # handing connections back does: every request is recorded once, with its outcome and the refusal's reason
    import asyncio
    import threading

    from benchmarks.loadgen import NativeLoad, sample_images

    native_or_skip()
    answered = []
    ready, loop_box = threading.Event(), {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            answered.append(length)
            refused, closing = len(answered) % 2 == 0, len(answered) % 7 == 0
            body = b'{"error": "Too many requests: the limit"}' if refused else b'{"outputs": []}'
            writer.write(b"HTTP/1.1 " + (b"429 Too Many Requests" if refused else b"200 OK") +
                         b"\r\ncontent-length: " + str(len(body)).encode() +
                         (b"\r\nconnection: close" if closing else b"") + b"\r\n\r\n" + body)
            await writer.drain()
            if closing:
                break
        writer.close()

    def serve() -> None:
        loop = asyncio.new_event_loop()
        server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
        loop_box["port"], loop_box["loop"] = server.sockets[0].getsockname()[1], loop
        ready.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    serving = threading.Thread(target=serve, daemon=True)
    serving.start()
    ready.wait(5)
    samples = NativeLoad("http", loop_box["port"], sample_images(), connections=4).open_loop(400, 0.5)
    loop_box["loop"].call_soon_threadsafe(loop_box["loop"].stop)
    serving.join(5)
    assert len(samples) == 200 == len(answered)
    outcomes = [s.outcome for s in samples]
    assert outcomes.count("ok") == outcomes.count("rejected") == 100
    assert {s.reason for s in samples if s.outcome == "rejected"} == {"concurrency"}
    dues = sorted(s.due for s in samples)
    assert dues[-1] - dues[0] == pytest.approx(199 / 400, abs=1e-6)  # request i due at start + i / rate
    assert all(s.latency_s >= s.sent_late_s >= 0 for s in samples)
