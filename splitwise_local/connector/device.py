"""Where KV crosses between a GPU and host memory, and the CUDA events that order those copies.

The saver gathers a step's chunks on the device and sends them to pinned host memory without
blocking the forward (`to_host`), then marks the end of those copies (`copies_done`) for its
background thread to wait on. The loader writes host rows into the device's cache
(`to_device`, through `KVLayout.scatter`) on a stream of its own, ordered after what vLLM's
stream queued into the blocks and reported only once landed (`DeviceOrder`). On the CPU each
of these is the identity or a no-op.

This module needs torch alone: `scripts/gpu_check.sh` runs it on GPU machines without vLLM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# torch leaves the constructors of `torch.cuda.Event` and `Stream`, and `Event.query`,
# unannotated: their calls below carry `type: ignore[no-untyped-call]`.


def _event() -> torch.cuda.Event:
    return torch.cuda.Event()  # type: ignore[no-untyped-call]


def to_host(rows: torch.Tensor) -> torch.Tensor:
    """`rows` in pinned host memory, copied without blocking the device's stream (on the CPU,
    `rows` itself). The copy has landed once the event of a later `copies_done` completes."""
    if rows.device.type == "cpu":
        return rows
    host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    host.copy_(rows, non_blocking=True)
    return host


def copies_done(device: torch.device) -> torch.cuda.Event | None:
    """An event after every copy queued so far on `device`'s current stream (None on the CPU)."""
    if device.type != "cuda":
        return None
    event = _event()
    event.record()
    return event


def has_landed(event: torch.cuda.Event | None) -> bool:
    """Whether the copies before `event` have all completed (None: nothing was in flight)."""
    return event is None or bool(event.query())  # type: ignore[no-untyped-call]


def to_device(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`rows` on `device`. Host rows bound for a GPU are staged in pinned memory and copied
    without blocking, on the current stream, so the scatter queued after the copy reads them in
    order, and the caller's buffer (a store lease) may be released as soon as this returns:
    PyTorch's pinned allocator keeps the staging buffer until the copy is done."""
    if device.type != "cuda" or rows.device.type != "cpu":
        return rows.to(device)
    staged = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    staged.copy_(rows)
    return staged.to(device, non_blocking=True)


class DeviceOrder:
    """Orders the loader's copies against vLLM's stream with CUDA events; no-ops on the CPU."""

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None  # type: ignore[no-untyped-call]

    def mark(self) -> torch.cuda.Event | None:
        """On the forward thread: an event after everything vLLM's stream has queued so far."""
        if self.stream is None:
            return None
        event = _event()
        event.record()
        return event

    @contextlib.contextmanager
    def copies(self, after: torch.cuda.Event | None) -> Iterator[list[torch.cuda.Event]]:
        """Copies inside go on the loader's stream, after `after`; yields a list that holds,
        once the block exits, the event that completes when they have all landed."""
        landed: list[torch.cuda.Event] = []
        if self.stream is None:
            yield landed
            return
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            try:
                yield landed
            finally:
                event = _event()
                event.record(self.stream)
                landed.append(event)
