"""How a worker decides to hand HTTP connections back (serving/connections.py), two workers sharing one file."""

from __future__ import annotations

from serving.connections import ConnectionShare


def test_a_worker_hands_back_what_is_over_its_share_and_no_more(tmp_path):
    busy, idle = ConnectionShare(tmp_path / "c", 2, 0), ConnectionShare(tmp_path / "c", 2, 1)
    for peer in range(8):
        busy.opened(peer)
    assert [busy.hand_back(peer) for peer in range(8)] == [True] * 4 + [False] * 4
    assert busy.hand_back(0), "a connection handed back stays handed back until it closes"
    for peer in range(4):
        busy.closed(peer)
    for peer in range(8, 12):  # they reconnected: three to the idle worker, one to the busy one again
        (idle if peer < 11 else busy).opened(peer)
    assert [busy.hand_back(peer) for peer in (4, 5, 6, 7, 11)] == [True, False, False, False, False]
    assert not any(idle.hand_back(peer) for peer in (8, 9, 10))


def test_a_lone_worker_keeps_everything(tmp_path):
    share = ConnectionShare(tmp_path / "c", 1, 0)
    for peer in range(5):
        share.opened(peer)
    assert not any(share.hand_back(peer) for peer in range(5))
