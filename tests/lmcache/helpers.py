"""LMCache's own message classes on a plain socket: what a request and a reply look like."""

from __future__ import annotations

import socket

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.protocol import ClientCommand, ClientMetaMessage, ServerMetaMessage

from splitwise_local.store.transport import recv_exact

STATUS_FORMAT = MemoryFormat(1)  # what LMCache's connector sends with GET and EXIST


def key(chunk: int, model: str = "splitwise-test") -> CacheEngineKey:
    return CacheEngineKey(model, 1, 0, chunk, torch.bfloat16)


def request(
    command: ClientCommand,
    chunk_key: CacheEngineKey,
    length: int = 0,
    fmt: MemoryFormat = STATUS_FORMAT,
    dtype: torch.dtype = torch.float16,
    shape: tuple[int, ...] = (0, 0, 0, 0),
) -> bytes:
    """A ClientMetaMessage as LMCache serializes it (status queries use LMCache's defaults)."""
    return ClientMetaMessage(command, chunk_key, length, fmt, dtype, torch.Size(shape)).serialize()


def reply(sock: socket.socket) -> ServerMetaMessage:
    return ServerMetaMessage.deserialize(bytes(recv_exact(sock, ServerMetaMessage.packlength())))


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (EOF or reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
