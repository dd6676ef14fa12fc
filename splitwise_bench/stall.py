"""A token stream on an engine, timed token by token, and its gaps while other requests run.

What `bench routing` (a prompt sent straight to decode or through prefill), `bench connector`
(prompts whose KV lands on the decode engine) and `bench save_stall` (prompts the engine computes
and saves to a store slow to write) judge decode's stalls by.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class StreamGaps:
    """Seconds between a stream's tokens: before the disturbance and overlapping it."""

    quiet: list[float]
    during: list[float]
    disturbance_s: float

    @property
    def quiet_p50(self) -> float:
        return statistics.median(self.quiet)


class Stream:
    """A long greedy generation on one engine, in a thread, recording when each token came,
    until it ends or is stopped."""

    def __init__(self, url: str, model: str, prompt: list[int], tokens: int = 120) -> None:
        self.arrivals: list[float] = []
        self.error: Exception | None = None
        self._stop = threading.Event()
        body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        self._thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self._thread.start()

    def _run(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as reply:
                reply.raise_for_status()
                for line in reply.iter_lines():
                    if line.startswith("data: ") and '"text"' in line:
                        self.arrivals.append(time.perf_counter())
                    if self._stop.is_set():
                        return  # closing the connection aborts the generation
        except Exception as exc:  # told to whoever waits for it, not lost in the thread
            self.error = exc

    def wait_started(self, tokens: int = 8, timeout: float = 120.0) -> None:
        """Returns once `tokens` tokens have come; raises if the stream failed, ended short or
        did not get there within `timeout` seconds (an engine that stopped answering)."""
        deadline = time.monotonic() + timeout
        while True:
            running = self._thread.is_alive()  # read first: its last tokens come before it ends
            if len(self.arrivals) >= tokens:
                return
            if self.error is not None:
                raise RuntimeError(f"the background stream failed: {self.error!r}")
            if not running:
                raise RuntimeError(f"the background stream ended after {len(self.arrivals)} tokens")
            if time.monotonic() > deadline:
                had = len(self.arrivals)
                raise TimeoutError(f"the background stream had {had} of {tokens} tokens by now")
            time.sleep(0.005)

    def gaps(self, start: float, end: float) -> list[float]:
        """Gaps between consecutive tokens that end inside [start, end + one gap]."""
        return [b - a for a, b in itertools.pairwise(self.arrivals) if b >= start and a <= end]

    def join(self) -> None:
        """Waits for the stream's end; raises if it failed (its gaps would mean nothing)."""
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"the background stream failed: {self.error!r}")

    def stop(self) -> None:
        """Ends the stream at its next token; raises if it failed or had already ended (its
        gaps would then not cover what was measured)."""
        ended = not self._thread.is_alive()
        self._stop.set()
        self.join()
        if ended:
            raise RuntimeError(f"the background stream ended after {len(self.arrivals)} tokens")


def disturbed_stream(
    url: str,
    model: str,
    prompt: list[int],
    tokens: int,
    quiet_tokens: int,
    disturb: Callable[[], object],
    start_timeout_s: float = 600,
) -> StreamGaps:
    """Streams `tokens` tokens of `prompt` from the engine at `url`; after `quiet_tokens` of them
    runs `disturb()` (which returns when the requests it sends are answered) while the stream
    goes on. Raises if the stream fails, never gets going within `start_timeout_s`, or ends
    before `disturb` does."""
    stream = Stream(url, model, prompt, tokens)
    stream.wait_started(quiet_tokens, start_timeout_s)
    sent = time.perf_counter()
    disturb()
    done = time.perf_counter()
    stream.join()
    during = stream.gaps(sent, done)
    if not during or stream.arrivals[-1] < done:
        raise RuntimeError("the stream ended before the disturbance did: stream more tokens")
    quiet = [b - a for a, b in itertools.pairwise(stream.arrivals[:quiet_tokens])]
    return StreamGaps(quiet, during, done - sent)
