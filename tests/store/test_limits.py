"""Capacity over a live server: LRU eviction, pins held by a shm reader, refusals, auth."""

from __future__ import annotations

import socket

import pytest

from splitwise_local.store import AuthError, StoreFull, open_backend, ops
from splitwise_local.store import protocol as p
from splitwise_local.store.client import Connection, ShmClient, StoreClient
from splitwise_local.store.transport import connect_tcp, connect_unix, recv_exact

PAGE = 4096


@pytest.fixture
def small(make_server):
    """Eight one-page slots."""
    return make_server(capacity=8 * PAGE, page_size=PAGE)


def test_eviction_follows_recent_use_across_both_paths(small):
    with open_backend(small.tcp_url) as tcp, open_backend(small.shm_url) as shm:
        for i in range(8):
            tcp.put(f"k{i}", bytes([i]) * PAGE)
        assert shm.get("k0") is not None  # k0 becomes the most recently used
        assert tcp.exists(["k1"]) == 1  # so does k1
        tcp.put_many([(f"n{i}", b"n" * PAGE) for i in range(3)])  # evicts k2, k3, k4
        present = [
            k for k in (f"k{i}" for i in range(8)) if small.index.exists_prefix([k.encode()])
        ]
        assert present == ["k0", "k1", "k5", "k6", "k7"]
        assert tcp.stats()["evictions"] == 3 and tcp.stats()["items"] == 8


def lease(conn: Connection, key: str) -> p.Grant:
    (grant,) = conn.run(ops.lease([key.encode()]))
    return grant


def test_value_a_shm_reader_holds_survives_pressure_until_its_next_frame(small):
    with open_backend(small.tcp_url) as tcp:
        tcp.put("held", b"h" * PAGE)
        reader = Connection(connect_unix(small.shm_name, 5), None)
        grant = lease(reader, "held")
        assert grant.length == PAGE and small.index.stats()["pinned"] == 1
        for i in range(40):  # five times the capacity
            tcp.put(f"x{i}", bytes([i]) * PAGE)
        assert bytes(tcp.get("held")) == b"h" * PAGE
        with pytest.raises(StoreFull):  # 7 pages can be freed, 8 cannot
            tcp.put("whole", b"w" * 8 * PAGE)
        assert bytes(small.arena.view[grant.extents[0][0] : grant.extents[0][0] + PAGE]) == (
            b"h" * PAGE
        )
        reader.run(ops.stats())  # the reader's next frame ends its lease
        tcp.put("whole", b"w" * 8 * PAGE)
        assert tcp.get("held") is None and small.index.stats()["pinned"] == 0
        reader.close()


def test_pins_of_a_vanished_reader_are_released(small):
    with open_backend(small.tcp_url) as tcp:
        tcp.put("held", b"h" * PAGE)
        reader = Connection(connect_unix(small.shm_name, 5), None)
        lease(reader, "held")
        reader.close()
        for i in range(8):
            tcp.put(f"x{i}", b"x" * PAGE)
        assert tcp.get("held") is None and tcp.stats()["pinned"] == 0


def raw_exchange(sock: socket.socket, *frames: bytes) -> tuple[p.Header, bytes]:
    """Sends frames and reads the final answer (earlier ones are read and skipped)."""
    sock.sendall(b"".join(frames))
    for _ in frames:
        header = p.decode_header(recv_exact(sock, p.HEADER.size))
        meta = bytes(recv_exact(sock, header.meta_len))
    return header, meta


def test_server_refuses_oversized_values_even_from_clients_that_do_not_check(make_server):
    server = make_server(capacity=64 * PAGE, page_size=PAGE, max_value=4 * PAGE)
    sock = connect_tcp("127.0.0.1", server.port, 5)
    meta = p.encode_sized_keys([(b"big", 4 * PAGE + 1)])
    header, message = raw_exchange(sock, p.frame(p.Op.HELLO), p.frame(p.Op.PUT, 1, meta))
    assert header.code == p.Status.VALUE_TOO_LARGE and b"exceeds" in message
    assert sock.recv(1) == b""  # the connection is closed after an error
    sock.close()
    assert server.index.stats()["items"] == 0
    assert server.index.stats()["refused"] == 1  # counted as a rejected put (/metrics)


def test_first_frame_must_be_hello_and_shm_ops_need_the_unix_socket(server):
    sock = connect_tcp("127.0.0.1", server.port, 5)
    header, _ = raw_exchange(sock, p.frame(p.Op.STATS))
    assert header.code == p.Status.BAD_REQUEST
    sock.close()
    sock = connect_tcp("127.0.0.1", server.port, 5)
    header, _ = raw_exchange(sock, p.frame(p.Op.HELLO), p.frame(p.Op.ALLOC))
    assert header.code == p.Status.BAD_REQUEST
    sock.close()


def test_auth_token_is_enforced_on_both_paths(make_server):
    server = make_server(auth_token="s3cret")
    for token in (None, "wrong"):
        for client in (
            StoreClient.tcp("127.0.0.1", server.port, token=token),
            ShmClient(server.shm_name, token=token),
        ):
            with client, pytest.raises(AuthError):
                client.put("k", b"v")
    with ShmClient(server.shm_name, token="s3cret") as client:
        client.put("k", b"v")
        assert client.delete("k")
    sock = connect_tcp("127.0.0.1", server.port, 5)
    hello = p.frame(p.Op.HELLO, 0, p.encode_json({"token": ["s3cret"]}))
    assert raw_exchange(sock, hello)[0].code == p.Status.AUTH_FAILED
    sock.close()
    assert server.index.stats()["items"] == 0


def test_version_mismatch_is_answered_and_reported(server):
    sock = connect_tcp("127.0.0.1", server.port, 5)
    sock.sendall(p.HEADER.pack(p.MAGIC, p.VERSION + 1, p.Op.HELLO, 0, 0, 0))
    header = p.HEADER.unpack(recv_exact(sock, p.HEADER.size))
    assert header[2] == p.Status.UNSUPPORTED_VERSION
    sock.close()


def test_shm_puts_keep_at_most_one_spare_slot_and_never_fail_for_it(small):
    with ShmClient(small.shm_name) as shm:
        for i, size in enumerate([PAGE, PAGE, 10, 3 * PAGE, 0, 2 * PAGE]):
            shm.put(f"v{i}", bytes([i]) * size)
            assert bytes(shm.get(f"v{i}")) == bytes([i]) * size
            stats = small.index.stats()
            assert stats["pending"] == (1 if size else 0) and stats["used_bytes"] <= 8 * PAGE
        shm.put("whole", b"w" * 8 * PAGE)  # no room is left for a spare: still a success
        assert bytes(shm.get("whole")) == b"w" * 8 * PAGE
        assert small.index.stats()["pending"] == 0
    assert small.index.stats()["items"] == 1
