"""LMCache's wire protocol against our store, frame by frame, with LMCache's own message classes."""

from __future__ import annotations

import re
import socket
import struct
import time
from pathlib import Path

import pytest
import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.protocol import (
    DTYPE_TO_INT,
    INT_TO_DTYPE,
    INT_TO_LOCATION,
    MAX_KEY_LENGTH,
    ClientCommand,
    ClientMetaMessage,
    ServerMetaMessage,
    ServerReturnCode,
)

from splitwise_bench.store_lmcache import lmcache_server
from splitwise_local.store import lmcache_protocol as lp
from splitwise_local.store import open_backend
from splitwise_local.store import protocol as p
from splitwise_local.store.transport import recv_exact
from tests.lmcache.helpers import closed_by_server, key, reply, request

MiB = 1024 * 1024


def test_frame_layout_and_codes_are_lmcaches() -> None:
    assert lp.REQUEST.size == ClientMetaMessage.packlength()
    assert lp.REPLY.size == ServerMetaMessage.packlength()
    assert lp.MAX_KEY == MAX_KEY_LENGTH
    assert {c.name: c.value for c in lp.Command} == {c.name: c.value for c in ClientCommand}
    assert (lp.SUCCESS, lp.FAIL) == (ServerReturnCode.SUCCESS, ServerReturnCode.FAIL)
    assert set(lp.FORMATS) == {f.value for f in MemoryFormat}
    assert set(lp.DTYPES) == set(INT_TO_DTYPE)
    assert set(lp.LOCATIONS) == set(INT_TO_LOCATION)
    assert DTYPE_TO_INT[None] == lp.NO_DTYPE
    assert MemoryFormat.BINARY_BUFFER.value == lp.BINARY_BUFFER


def test_first_four_bytes_tell_the_protocols_apart() -> None:
    for command in ClientCommand:
        assert lp.speaks_lmcache(request(command, key(1))[:4])
    assert not lp.speaks_lmcache(p.MAGIC)
    assert not lp.speaks_lmcache(struct.pack("<i", 0))


def test_a_request_decodes_to_what_lmcache_encoded() -> None:
    data = request(ClientCommand.PUT, key(7), 123, MemoryFormat.KV_T2D, torch.float16, (3, 4, 5))
    decoded = lp.decode_request(data)
    assert decoded.command == lp.Command.PUT
    assert decoded.key == key(7).to_string().encode()
    assert decoded.length == 123
    assert decoded.tag == lp.Tag(
        MemoryFormat.KV_T2D.value, DTYPE_TO_INT[torch.float16], (3, 4, 5, 0)
    )
    answer = ServerMetaMessage.deserialize(lp.encode_reply(lp.SUCCESS, 123, decoded.tag))
    assert (answer.code, answer.length) == (ServerReturnCode.SUCCESS, 123)
    assert (answer.fmt, answer.dtype, answer.shape) == (
        MemoryFormat.KV_T2D,
        torch.float16,
        torch.Size([3, 4, 5]),
    )


def test_health_exist_put_get_over_a_raw_connection(server, raw) -> None:
    sock = raw(server.port)
    sock.sendall(request(ClientCommand.HEALTH, key(0)))
    assert reply(sock).code == ServerReturnCode.SUCCESS
    sock.sendall(request(ClientCommand.EXIST, key(1)))
    assert reply(sock).code == ServerReturnCode.FAIL
    value = bytes(range(256)) * 16
    put = request(ClientCommand.PUT, key(1), len(value), MemoryFormat.KV_2LTD, torch.bfloat16)
    sock.sendall(put + value)  # no reply to a PUT
    sock.sendall(request(ClientCommand.EXIST, key(1)))
    assert reply(sock).code == ServerReturnCode.SUCCESS
    sock.sendall(request(ClientCommand.GET, key(1)))
    answer = reply(sock)
    assert (answer.code, answer.length, answer.fmt) == (200, len(value), MemoryFormat.KV_2LTD)
    got = b""
    while len(got) < len(value):
        got += sock.recv(len(value) - len(got))
    assert got == value
    sock.sendall(request(ClientCommand.GET, key(2)))
    assert reply(sock).code == ServerReturnCode.FAIL


def test_replies_match_lmcaches_own_server_byte_for_byte(server, raw) -> None:
    """The same conversation with LMCache's server and ours gets the same 36-byte replies."""
    value = bytes(4096)
    put = request(
        ClientCommand.PUT,
        key(3),
        len(value),
        MemoryFormat.KV_MLA_FMT,
        torch.bfloat16,
        (1, 2, 8, 128),
    )
    conversation = [
        (request(ClientCommand.HEALTH, key(0)), True),
        (request(ClientCommand.EXIST, key(3)), True),
        (request(ClientCommand.GET, key(3)), True),
        (put + value, False),
        (request(ClientCommand.EXIST, key(3)), True),
        (request(ClientCommand.GET, key(3)), True),
    ]

    def replies(port: int) -> list[bytes]:
        sock = raw(port)
        answers = []
        for frame, answered in conversation:
            sock.sendall(frame)
            if answered:
                head = bytes(recv_exact(sock, ServerMetaMessage.packlength()))
                answers.append(head)
                length = ServerMetaMessage.deserialize(head).length
                if length:
                    answers.append(bytes(recv_exact(sock, length)))
        return answers

    with lmcache_server() as (_, url):
        theirs = replies(int(url.rsplit(":", 1)[1]))
    assert replies(server.port) == theirs


def test_a_truncated_header_closes_only_that_connection(make_server, raw, lmcache_client) -> None:
    server = make_server(frame_timeout=0.5)
    client = lmcache_client(server.tcp_url)
    obj = client.value((2, 2, 16, 64))
    client.put(client.key(1), obj)
    header = request(ClientCommand.PUT, key(9), 1024)
    cut = raw(server.port)  # half a header, then the sender goes away
    cut.sendall(header[:100])
    cut.shutdown(socket.SHUT_WR)
    stalled = raw(server.port)  # half a header, then silence past the I/O timeout
    stalled.sendall(header[:100])
    assert closed_by_server(cut)
    assert closed_by_server(stalled)
    got = client.get(client.key(1))  # the connection opened before is untouched
    assert got is not None and bytes(got.byte_array) == bytes(obj.byte_array)
    client.free(got)
    fresh = raw(server.port)
    fresh.sendall(request(ClientCommand.HEALTH, key(0)))
    assert reply(fresh).code == ServerReturnCode.SUCCESS
    with open_backend(server.tcp_url) as ours:
        assert ours.stats()["pending"] == 0


def test_a_value_cut_short_is_never_visible(server, raw) -> None:
    sock = raw(server.port)
    sock.sendall(request(ClientCommand.PUT, key(5), MiB) + bytes(MiB // 2))
    sock.close()
    with open_backend(server.tcp_url) as ours:
        deadline = time.monotonic() + 10
        while ours.stats()["aborted"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = ours.stats()
        assert (stats["aborted"], stats["pending"], stats["items"]) == (1, 0, 0)
        assert ours.exists([key(5).to_string()]) == 0


def _with_int(frame: bytes, field: int, value: int) -> bytes:
    data = bytearray(frame)
    struct.pack_into("<i", data, 4 * field, value)
    return bytes(data)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(request(ClientCommand.LIST, key(1)), id="LIST (LMCache's server ignores it)"),
        pytest.param(_with_int(request(ClientCommand.PUT, key(1), 8), 3, 99), id="unknown dtype"),
        pytest.param(_with_int(request(ClientCommand.PUT, key(1), 8), 2, 99), id="unknown fmt"),
        pytest.param(_with_int(request(ClientCommand.PUT, key(1), 8), 1, -8), id="negative length"),
        pytest.param(request(ClientCommand.GET, key(1))[:36] + b" " * 150, id="empty key"),
    ],
)
def test_malformed_requests_close_only_that_connection(server, raw, frame: bytes) -> None:
    bad, good = raw(server.port), raw(server.port)
    bad.sendall(frame)
    assert closed_by_server(bad)
    good.sendall(request(ClientCommand.HEALTH, key(0)))
    assert reply(good).code == ServerReturnCode.SUCCESS


def test_an_oversized_put_is_dropped_and_the_stream_stays_in_step(make_server, raw) -> None:
    server = make_server(max_value=MiB)
    sock = raw(server.port)
    sock.sendall(request(ClientCommand.PUT, key(1), 2 * MiB) + bytes(2 * MiB))
    sock.sendall(request(ClientCommand.EXIST, key(1)))
    assert reply(sock).code == ServerReturnCode.FAIL
    sock.sendall(request(ClientCommand.PUT, key(2), 16) + b"x" * 16)
    sock.sendall(request(ClientCommand.EXIST, key(2)))
    assert reply(sock).code == ServerReturnCode.SUCCESS
    with open_backend(server.tcp_url) as ours:
        assert ours.stats()["refused"] == 1


def test_a_store_with_a_token_refuses_lmcache_clients(make_server, raw) -> None:
    """LMCache's protocol has no field for a token: such clients cannot be let in."""
    server = make_server(auth_token="s3cret")
    sock = raw(server.port)
    sock.sendall(request(ClientCommand.HEALTH, key(0)))
    assert closed_by_server(sock)
    from splitwise_local.store.client import StoreClient

    with StoreClient.tcp("127.0.0.1", server.port, token="s3cret") as ours:
        assert ours.stats()["items"] == 0


def test_an_idle_connection_outlives_the_io_timeout(make_server, raw) -> None:
    """The I/O timeout bounds a started request; between requests a client may idle."""
    server = make_server(frame_timeout=0.05)
    sock = raw(server.port)
    sock.sendall(request(ClientCommand.HEALTH, key(0)))
    assert reply(sock).code == ServerReturnCode.SUCCESS
    time.sleep(0.5)
    sock.sendall(request(ClientCommand.HEALTH, key(0)))
    assert reply(sock).code == ServerReturnCode.SUCCESS


def test_a_trickled_request_is_dropped_at_the_frame_deadline(make_server, raw) -> None:
    """Every byte comes well within any per-receive timeout; the request as a whole does not."""
    server = make_server(frame_timeout=0.5)
    sock = raw(server.port)
    sock.sendall(request(ClientCommand.HEALTH, key(0)))  # a first request: past the handshake
    assert reply(sock).code == ServerReturnCode.SUCCESS
    frame = request(ClientCommand.EXIST, key(1))
    for sent in range(len(frame)):
        try:
            sock.send(frame[sent : sent + 1])
        except OSError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the trickled request was read whole")
    assert sent < len(frame)
    with open_backend(server.tcp_url) as ours:
        assert ours.stats()["connections"] == 1  # only ours is left


def test_a_put_without_its_value_evicts_nothing(make_server, raw) -> None:
    """A PUT announcing the whole capacity reserves pages only as its bytes arrive."""
    server = make_server(capacity=8 * MiB, page_size=64 * 1024, max_value=8 * MiB)
    with open_backend(server.tcp_url) as ours:
        for i in range(8):
            ours.put(f"v{i}", bytes([i]) * (MiB - 4096))
        sock = raw(server.port)
        sock.sendall(request(ClientCommand.PUT, key(1), 8 * MiB))
        deadline = time.monotonic() + 10
        while server.index.stats()["pending"] == 0:
            assert time.monotonic() < deadline, "the PUT never started"
            time.sleep(0.01)
        assert ours.stats()["evictions"] == 0 and ours.stats()["items"] == 8
        sock.close()
        while server.index.stats()["pending"]:
            assert time.monotonic() < deadline, "the abandoned PUT was never aborted"
            time.sleep(0.01)
        assert ours.exists([f"v{i}" for i in range(8)]) == 8


def test_lmcache_connections_count_as_unauthenticated_until_their_first_request(
    make_server, raw
) -> None:
    server = make_server(max_unauthenticated=1)
    quiet = raw(server.port)
    quiet.sendall(request(ClientCommand.HEALTH, key(0))[:10])  # a request begun, not finished
    busy = raw(server.port)
    header = p.decode_header(recv_exact(busy, p.HEADER.size))
    assert header.code == p.Status.BUSY
    quiet.sendall(request(ClientCommand.HEALTH, key(0))[10:])
    assert reply(quiet).code == ServerReturnCode.SUCCESS
    fresh = raw(server.port)  # the first has proved itself: there is room again
    fresh.sendall(request(ClientCommand.HEALTH, key(0)))
    assert reply(fresh).code == ServerReturnCode.SUCCESS


def test_the_documented_lmcache_example_is_what_lmcache_and_the_store_produce() -> None:
    text = (Path(__file__).parents[2] / "docs" / "wire-format.md").read_text()
    block = text.split("Example, EXIST of `m@1@0@2a@bfloat16`", 1)[1].split("```", 2)[1]
    documented_request, documented_reply = (
        bytes.fromhex(" ".join(re.split(r"\s{3,}", line.strip())[0] for line in part.splitlines()))
        for part in block.replace("request:", "").split("reply:")
    )
    chunk = CacheEngineKey("m", 1, 0, 0x2A, torch.bfloat16)
    assert request(ClientCommand.EXIST, chunk).startswith(documented_request)
    assert lp.encode_reply(lp.SUCCESS) == documented_reply
    assert (
        documented_reply
        == ServerMetaMessage(
            ServerReturnCode.SUCCESS, 0, MemoryFormat(1), torch.float16, torch.Size([0, 0, 0, 0])
        ).serialize()
    )
