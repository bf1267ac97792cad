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
