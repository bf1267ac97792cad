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
