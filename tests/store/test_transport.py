"""Socket plumbing: the buffered reader's edges, gathered sends, control socket names."""

from __future__ import annotations

import socket

import pytest

from splitwise_local.store.transport import PeerClosed, SocketReader, control_address, send_all


@pytest.fixture
def pair():
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def test_reads_across_buffer_refills_and_straight_into_targets(pair):
    left, right = pair
    reader = SocketReader(right, size=16)
    payload = bytes(range(256)) * 40
    send_all(left, [payload[:5], memoryview(payload[5:100]), bytearray(payload[100:])])
    assert reader.read(10) == payload[:10]
    assert reader.read(14) == payload[10:24]  # refills, moving the partial read to the front
    target = memoryview(bytearray(1000))
    reader.read_into(target)  # part from the buffer, the rest from the socket
    assert bytes(target) == payload[24:1024]
    assert reader.read(5000) == payload[1024:6024]  # larger than the buffer
    assert reader.read(0) == b""


def test_end_of_stream_is_clean_only_between_frames(pair):
    left, right = pair
    reader = SocketReader(right)
    left.sendall(b"abc")
    left.shutdown(socket.SHUT_WR)
    assert reader.read(2, first=True) == b"ab"
    with pytest.raises(PeerClosed) as unclean:
        reader.read(2, first=True)
    assert not unclean.value.clean
    assert reader.read(1) == b"c"
    with pytest.raises(PeerClosed) as clean:
        reader.read(1, first=True)
    assert clean.value.clean


def test_control_address_is_abstract_and_validated():
    assert control_address("splitwise-10080") == "\0splitwise-store/splitwise-10080"
    for bad in ("", "a/b", "x" * 81, "tab\there"):
        with pytest.raises(ValueError):
            control_address(bad)
