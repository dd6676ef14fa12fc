"""Admission control: a bound on the prompt tokens each engine role has queued, past which a
request is refused at once (429 with `Retry-After`) instead of queueing inside the engines.

Gateways in front of LLM engines do the same (llm-d's flow control, Dynamo's load shedding,
SGLang's router's token bucket): without it a load past capacity makes every request wait, and
the time to first token grows without bound for all of them.

What is counted: a request's route (routing.py) says which role computes its prompt first (the
prefill engines on the disaggregated path, the decode engines when it goes straight there) and
how many tokens that engine computes: the whole prompt through prefill, only the uncached part
straight to decode. Those tokens are queued on that role from admission until the engine's first
answer (prefill's one token, decode's first event), the hop's failure, or the caller leaving,
whichever comes first (a `Ticket`). A prompt the proxy did not tokenize counts as its body's size
over `BYTES_PER_TOKEN` (JSON framing makes that an overestimate).

The bound is `admission_tokens` when set, else measured: the role's clearing rate (tokens
answered per second of the time it had tokens queued, over windows of `WINDOW_S` busy seconds,
smoothed) times `admission_ttft_s`, the tokens it clears within that time. Until the first window
closes it is `busy_tokens` per engine of the role (one full prefill batch).

A request is admitted when its role has nothing queued (a prompt larger than the bound still
runs, alone) or when the queue plus its tokens stays within the bound. Requests with a stored
prefix are cheap (counted for their uncached tokens only) and have priority: the last
`STORED_SHARE` of the bound is theirs alone. A refusal costs no engine call: a 429 in OpenAI's
format whose `Retry-After` is the seconds the role needs, at its measured rate, to clear the
excess. /metrics counts refusals per role and shows each role's queue, bound and rate.

Accounting runs whether or not `admission` is on, so /metrics shows the measured bound before
anyone turns refusals on. Work a fallback moves to the other role (decode computing a prompt
whose prefill failed) is not counted there: that request was admitted already.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from starlette.responses import JSONResponse

from splitwise_local.proxy.errors import error_response
from splitwise_local.proxy.pool import EnginePool, Role
from splitwise_local.proxy.routing import Route
from splitwise_local.proxy.settings import ProxySettings

BYTES_PER_TOKEN = 4  # English text runs about 4 bytes per token
STORED_SHARE = 0.1  # of each role's bound, usable only by requests with a stored prefix
WINDOW_S = 1.0  # busy seconds per measurement of a role's clearing rate
SMOOTHING = 0.3  # weight of the newest window in the rate
MAX_RETRY_AFTER_S = 60


class Throughput:
    """Tokens a role clears per second of the time it has tokens queued; None until the first
    window of `WINDOW_S` busy seconds closes."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.per_s: float | None = None
        self._since = clock()
        self._busy_s = 0.0
        self._cleared = 0

    def advance(self, busy: bool) -> None:
        """Counts the time since the last change as busy if tokens were queued meanwhile."""
        now = self._clock()
        if busy:
            self._busy_s += now - self._since
        self._since = now

    def cleared(self, tokens: int) -> None:
        """An engine answered `tokens` queued prompt tokens; a full window updates the rate."""
        self._cleared += tokens
        if self._busy_s < WINDOW_S:
            return
        rate = self._cleared / self._busy_s
        previous = self.per_s
        self.per_s = rate if previous is None else SMOOTHING * rate + (1 - SMOOTHING) * previous
        self._busy_s, self._cleared = 0.0, 0


class RoleQueue:
    """One role's admitted prompt tokens that its engines have not answered yet, and the bound
    on them."""

    def __init__(
        self,
        role: Role,
        initial: int,
        settings: ProxySettings,
        clock: Callable[[], float],
    ) -> None:
        self.role = role
        self.queued = 0
        self.refused = 0
        self.rate = Throughput(clock)
        self._initial = initial
        self._fixed = settings.admission_tokens
        self._ttft_s = settings.admission_ttft_s

    @property
    def bound(self) -> int:
        """The most tokens it queues: fixed, measured, or the initial guess."""
        if self._fixed is not None:
            return self._fixed
        if self.rate.per_s is None:
            return self._initial
        return max(1, round(self.rate.per_s * self._ttft_s))

    def limit(self, cheap: bool) -> int:
        """The bound for a request, less the share kept for cheap ones unless it is one."""
        bound = self.bound
        return bound if cheap else math.floor(bound * (1 - STORED_SHARE))

    def fits(self, tokens: int, cheap: bool) -> bool:
        """Whether a request of `tokens` may join the queue now."""
        return self.queued == 0 or self.queued + tokens <= self.limit(cheap)

    def retry_after_s(self, tokens: int, cheap: bool) -> int:
        """Seconds until the queue, at the measured rate, has room for `tokens` (1 unmeasured)."""
        per_s = self.rate.per_s
        if not per_s:
            return 1
        excess = self.queued + tokens - self.limit(cheap)
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(excess / per_s)))

    def hold(self, tokens: int) -> None:
        self.rate.advance(self.queued > 0)
        self.queued += tokens

    def release(self, tokens: int, cleared: bool) -> None:
        """Takes `tokens` off the queue; `cleared`: an engine answered them (measured)."""
        self.rate.advance(self.queued > 0)
        self.queued -= tokens
        if cleared:
            self.rate.cleared(tokens)


class Ticket:
    """An admitted request's queued tokens, released once: when the hop of their role is
    answered (`answered`) or at the latest when the request ends (`close`)."""

    def __init__(self, queue: RoleQueue | None = None, tokens: int = 0) -> None:
        self._queue = queue
        self._tokens = tokens

    def answered(self, role: Role, ok: bool) -> None:
        """The hop to `role` has its first answer (`ok`: a success) or failed."""
        queue = self._queue
        if queue is not None and queue.role == role:
            self._queue = None
            queue.release(self._tokens, cleared=ok)

    def close(self) -> None:
        """The request ended (or its caller left) before that: the tokens leave the queue."""
        queue, self._queue = self._queue, None
        if queue is not None:
            queue.release(self._tokens, cleared=False)


@dataclass(frozen=True)
class Refusal:
    """A request refused because its role's queue is full."""

    role: Role
    retry_after_s: int

    def response(self) -> JSONResponse:
        """OpenAI's 429, with the seconds to wait."""
        message = (
            f"the {self.role} engines have more prompt tokens queued than they can start within "
            f"the time-to-first-token target; retry after {self.retry_after_s} s"
        )
        headers = {"retry-after": str(self.retry_after_s)}
        return error_response(429, message, code="rate_limit_exceeded", headers=headers)


class Admission:
    """Admits each routed request against its first role's queue, or refuses it."""

    def __init__(
        self,
        settings: ProxySettings,
        pools: Iterable[EnginePool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = settings.admission
        self.queues = {
            pool.role: RoleQueue(
                pool.role, settings.busy_tokens * max(1, len(pool.endpoints)), settings, clock
            )
            for pool in pools
        }

    def admit(self, route: Route, body_bytes: int) -> Ticket | Refusal:
        """A ticket holding the route's first hop's prompt tokens on its role, or a refusal
        (only with admission on) when they do not fit."""
        hop = route.prefill or route.generate
        tokens = hop.tokens if route.prompt.tokens is not None else body_bytes // BYTES_PER_TOKEN
        if tokens <= 0:
            return Ticket()
        queue = self.queues[hop.role]
        cheap = route.prompt.stored > 0
        if self.enabled and not queue.fits(tokens, cheap):
            queue.refused += 1
            return Refusal(hop.role, queue.retry_after_s(tokens, cheap))
        queue.hold(tokens)
        return Ticket(queue, tokens)
