"""What a stranger, or a slow or greedy client, may cost the store: stalled handshakes, frames
trickled byte by byte, crowds of connections, puts that announce more than they send, and
same-host clients without the token. Each limit holds for the offender only: everyone else
keeps being served."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time

import psutil
import pytest

from splitwise_local.store import AuthError, StoreUnavailable, open_backend, ops
from splitwise_local.store import protocol as p
from splitwise_local.store.client import Connection, ShmClient, StoreClient
from splitwise_local.store.transport import connect_tcp, connect_unix, recv_exact
from tests.store.helpers import store_process

MiB = 1 << 20
PAGE = 4096
TOKEN = "s3cret"
HELLO = p.frame(p.Op.HELLO, 0, p.encode_json({"token": TOKEN}))


def wait_for(condition, seconds: float = 10) -> None:
    """Polls `condition` until it holds; a generous hang guard, not a timing assertion."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def answer(sock: socket.socket) -> tuple[p.Header, bytes]:
    header = p.decode_header(recv_exact(sock, p.HEADER.size))
    return header, bytes(recv_exact(sock, header.meta_len))


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed (or reset) this connection, without waiting."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        while data := sock.recv(65536):
            if len(data) < 65536:
                return False  # an answer, not the end
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def test_stalled_handshakes_cost_a_token_protected_store_little(tmp_path):
    """24 connections announcing a 16 MiB HELLO and 24 announcing the largest allowed one, each
    sending a single byte of it: the store refuses the first kind before reading anything and
    holds the second in a few KiB each (it used to read HELLO into a buffer allocated whole
    from the announced length, before checking the token)."""
    config = tmp_path / "store.yaml"
    config.write_text(f"store_auth_token: {TOKEN}\n")
    with store_process("--max-size-gb", "0.0625", "--config", str(config)) as store:
        port = int(store.tcp_url.rsplit(":", 1)[1])
        process = psutil.Process(store.process.pid)
        with StoreClient.tcp("127.0.0.1", port, token=TOKEN) as client:
            client.put("before", b"b" * MiB)  # the store has warmed up its data path
            rss = process.memory_info().rss
            oversized = [socket.create_connection(("127.0.0.1", port)) for _ in range(24)]
            for sock in oversized:
                sock.sendall(p.encode_header(p.Op.HELLO, 0, 16 * MiB) + b"{")
            for sock in oversized:
                header, message = answer(sock)
                assert header.code == p.Status.BAD_FRAME and b"HELLO metadata" in message
            grown = process.memory_info().rss - rss
            assert grown < 64 * MiB, f"RSS grew {grown / MiB:.0f} MiB"
            for sock in oversized:
                sock.close()
            wait_for(lambda: client.stats()["connections_unauthenticated"] == 0)
            largest = [socket.create_connection(("127.0.0.1", port)) for _ in range(24)]
            for sock in largest:
                sock.sendall(p.encode_header(p.Op.HELLO, 0, p.MAX_HELLO_META) + b"{")
            wait_for(lambda: client.stats()["connections_unauthenticated"] == 24)
            grown = process.memory_info().rss - rss
            assert grown < 64 * MiB, f"RSS grew {grown / MiB:.0f} MiB"
            assert bytes(client.get("before")) == b"b" * MiB  # the engines are still served
            for sock in largest:
                sock.close()


def put_header(key: bytes, length: int) -> bytes:
    return p.frame(p.Op.PUT, 1, p.encode_sized_keys([(key, length)]))


def test_a_put_evicts_only_what_its_writer_has_sent(make_server):
    server = make_server(capacity=8 * 16 * PAGE, page_size=PAGE, max_value=8 * 16 * PAGE)
    with open_backend(server.tcp_url) as client:
        for i in range(8):
            client.put(f"v{i}", bytes([i]) * 16 * PAGE)  # eight values fill the store
        writer = connect_tcp("127.0.0.1", server.port, 5)
        writer.sendall(p.frame(p.Op.HELLO))
        answer(writer)
        writer.sendall(put_header(b"big", 8 * 16 * PAGE))  # the whole capacity, no body yet
        wait_for(lambda: server.index.stats()["pending"] == 1)
        assert client.stats()["evictions"] == 0 and client.stats()["items"] == 8
        writer.sendall(b"x" * 20 * PAGE)  # a bit more than one value's worth arrives
        wait_for(lambda: server.index.stats()["used_bytes"] == (6 * 16 + 20) * PAGE)
        assert client.stats()["evictions"] == 2  # the two least recently used, no more
        assert client.exists([f"v{i}" for i in range(2, 8)]) == 6
        writer.close()  # the writer gives up: its value is never seen, its pages go back
        wait_for(lambda: server.index.stats()["pending"] == 0)
        assert client.get("big") is None and client.stats()["aborted"] == 1
        assert [bytes(v)[:1] for v in client.get_many([f"v{i}" for i in range(2, 8)])] == [
            bytes([i]) for i in range(2, 8)
        ]


def trickle(sock: socket.socket, data: bytes, pause: float) -> int:
    """Sends `data` a byte at a time; returns how many bytes went out before the server
    closed the connection (len(data) if it never did)."""
    for sent in range(len(data)):
        if closed_by_server(sock):
            return sent
        try:
            sock.send(data[sent : sent + 1])
        except OSError:
            return sent
        time.sleep(pause)
    return len(data)


def test_a_trickled_frame_is_dropped_at_the_frame_deadline_and_only_it(make_server):
    """Each byte arrives well within any per-receive timeout; the frame as a whole does not.
    An idle connection, and everyone else, are left alone."""
    server = make_server(frame_timeout=0.5)
    with open_backend(server.tcp_url) as client:
        client.put("k", b"v")
        idle = Connection(connect_tcp("127.0.0.1", server.port, 5), None)
        slow = connect_tcp("127.0.0.1", server.port, 5)
        slow.sendall(p.frame(p.Op.HELLO))
        answer(slow)
        frame = p.frame(p.Op.GET, 1, p.encode_keys([b"k" * 300]))
        sent = trickle(slow, frame, pause=0.05)
        assert sent < len(frame), "the trickled frame was served whole"
        slow.close()
        assert bytes(client.get("k")) == b"v"
        assert idle.run(ops.stats())["items"] == 1  # idle for longer than the deadline: fine
        idle.close()


def test_a_trickled_handshake_is_dropped_at_its_deadline_from_accept(make_server):
    server = make_server(frame_timeout=0.5, auth_token=TOKEN)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sent = trickle(sock, HELLO + b" " * 200, pause=0.05)  # well-formed until the deadline
    assert sent < len(HELLO)
    sock.close()
    wait_for(lambda: server.stats()["connections"] == 0)


def test_connections_beyond_the_caps_are_refused_with_a_clear_answer(make_server):
    server = make_server(auth_token=TOKEN, max_connections=4, max_unauthenticated=2)
    strangers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    wait_for(lambda: server.stats()["connections_unauthenticated"] == 2)
    third = socket.create_connection(("127.0.0.1", server.port))
    header, message = answer(third)
    assert header.code == p.Status.BUSY and b"to authenticate" in message
    with pytest.raises(StoreUnavailable, match="BUSY"), ShmClient(server.shm_name, TOKEN) as c:
        c.stats()
    for sock in (third, *strangers):
        sock.close()
    wait_for(lambda: server.stats()["connections"] == 0)
    engines = [StoreClient.tcp("127.0.0.1", server.port, token=TOKEN) for _ in range(4)]
    for engine in engines:
        engine.stats()  # four authenticated connections: the total cap
    with pytest.raises(StoreUnavailable, match="too many connections"):
        StoreClient.tcp("127.0.0.1", server.port, token=TOKEN).stats()
    assert server.stats()["refused_connections"] == 3
    engines.pop().close()
    wait_for(lambda: server.stats()["connections"] == 3)
    with StoreClient.tcp("127.0.0.1", server.port, token=TOKEN) as late:
        assert late.stats()["connections"] == 4
    for engine in engines:
        engine.close()


def test_strangers_that_never_speak_leave_at_the_deadline_and_free_their_places(make_server):
    server = make_server(auth_token=TOKEN, max_unauthenticated=2, frame_timeout=0.3)
    strangers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    for sock in strangers:
        assert sock.recv(1) == b""  # closed by the server, without a word
        sock.close()
    with StoreClient.tcp("127.0.0.1", server.port, token=TOKEN) as client:
        assert client.stats()["connections_unauthenticated"] == 0


def test_an_unauthenticated_same_host_client_gets_no_arena(make_server):
    server = make_server(auth_token=TOKEN)
    for frames, status in [
        (p.frame(p.Op.ATTACH), p.Status.BAD_REQUEST),  # no HELLO at all
        (p.frame(p.Op.HELLO) + p.frame(p.Op.ATTACH), p.Status.AUTH_FAILED),  # no token
    ]:
        sock = connect_unix(server.shm_name, 5)
        sock.sendall(frames)
        data, fds, _, _ = socket.recv_fds(sock, p.HEADER.size, 4)
        assert not fds, "an arena descriptor was handed out"
        assert p.decode_header(data + recv_exact(sock, p.HEADER.size - len(data))).code == status
        sock.close()
    with pytest.raises(AuthError), ShmClient(server.shm_name) as client:
        client.get("k")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_without_a_token_shared_memory_serves_only_the_stores_own_user(make_server):
    server = make_server()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # another user on the same host, with a raw socket
        status = 255
        with contextlib.suppress(BaseException):
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            sock = connect_unix(server.shm_name, 5)
            sock.sendall(p.frame(p.Op.HELLO) + p.frame(p.Op.ATTACH))
            data, fds, _, _ = socket.recv_fds(sock, p.HEADER.size, 4)
            status = 254 if fds else p.decode_header(data).code
        os.write(write_end, bytes([status]))
        os._exit(0)
    os.close(write_end)
    status = os.read(read_end, 1)
    os.close(read_end)
    os.waitpid(child, 0)
    assert status == bytes([p.Status.AUTH_FAILED])
    with ShmClient(server.shm_name) as mine:  # the store's own user still may
        mine.put("k", b"v")
        assert bytes(mine.get("k")) == b"v"
