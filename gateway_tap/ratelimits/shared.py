"""The ``shared`` limiter: the counters live in Redis, exact across every worker and tap.

Admission is one Lua script call (``EVALSHA``; one round trip, atomic: no other request runs between the
check and the take), with Redis's own clock so taps with skewed clocks agree. Per-minute counters are hashes
``{l: level in milli-units, t: ms}`` that expire once full again; a concurrency counter is a sorted set of
request ids scored by when their claim lapses (``rate_limiting.concurrency_lease_s``: the claim of a request
whose tap died without settling). Settlements (the token estimate replaced by the actual usage, the
concurrency claim ended) are not on any request's path: queued and sent in one pipeline per flush.

Both scripts take a lean path (:class:`_ScriptLane`): a connection of their own each, the commands packed in one
call of hiredis's C encoder, written in one write and read without redis-py's per-command machinery (the pool's
checkout, the arguments' encoding in Python, the script object's retry wrapper), which cost more CPU than the rest
of the tap did (BENCHMARKS.md, "Rate limits").

Keys of one request live on one server (no Redis Cluster slots across keys): run one Redis or a replicated
primary, not a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError

from gateway_tap.ratelimits.limiter import CounterState, Decision, Plan
from gateway_tap.redis_link import REDIS_ERRORS, RedisLink, ResponseError

log = logging.getLogger("gateway_tap.ratelimits")

USER = "ratelimit"
"""The ``user`` label of this module's Redis metrics."""

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, lease = ARGV[1], tonumber(ARGV[2])
local used, blocked, wait = {}, 0, 0
for i = 1, #KEYS do
  local j = 3 + (i - 1) * 3
  local kind, limit, cost = ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
  if kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    used[i] = redis.call('ZCARD', KEYS[i])
    if used[i] >= limit and blocked == 0 then blocked, wait = i, 1000 end
  else
    local s = redis.call('HMGET', KEYS[i], 'u', 't')
    local u = 0
    if s[1] then u = math.max(0, math.ceil(tonumber(s[1]) - (now - tonumber(s[2])) * limit / 60)) end
    used[i] = u
    local short = math.min(cost, limit) * 1000 - (limit * 1000 - u)
    if short > 0 and blocked == 0 then blocked, wait = i, math.ceil(short * 60 / limit) end
  end
end
local out = {blocked, wait}
for i = 1, #KEYS do
  local j = 3 + (i - 1) * 3
  local kind, limit, cost = ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
  local u = used[i]
  if kind == 'c' then
    if blocked == 0 then
      redis.call('ZADD', KEYS[i], now + lease, member)
      redis.call('PEXPIRE', KEYS[i], lease)
      u = u + 1
    end
    out[#out + 1] = limit - u
    out[#out + 1] = 0
  else
    if blocked == 0 then
      u = u + cost * 1000
      redis.call('HSET', KEYS[i], 'u', u, 't', now)
      redis.call('PEXPIRE', KEYS[i], math.ceil(u * 60 / limit) + 1000)
    end
    out[#out + 1] = math.floor((limit * 1000 - u) / 1000)
    out[#out + 1] = math.ceil(u * 60 / limit)
  end
end
return out
"""
"""KEYS: the counters; ARGV: request id, concurrency lease (ms), then per counter kind ('r' per minute, 'c'
concurrent), limit, cost. Per-minute counters keep ``u``, what is used in milli-units, drained since ``t``
(ms). Returns the blocking counter's index (0: admitted), the wait (ms), then per counter remaining and reset
(ms)."""

_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  local j = 2 + (i - 1) * 3
  local kind, limit, delta = ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
  if kind == 'c' then
    redis.call('ZREM', KEYS[i], ARGV[1])
  elseif delta ~= 0 then
    local s = redis.call('HMGET', KEYS[i], 'u', 't')
    local u = 0
    if s[1] then u = math.max(0, math.ceil(tonumber(s[1]) - (now - tonumber(s[2])) * limit / 60)) end
    u = math.max(0, u + delta * 1000)
    redis.call('HSET', KEYS[i], 'u', u, 't', now)
    redis.call('PEXPIRE', KEYS[i], math.ceil(u * 60 / limit) + 1000)
  end
end
return 0
"""
"""KEYS: the counters; ARGV: request id, then per counter kind, limit, tokens to add (actual - estimate; 0 for
requests)."""


class _ScriptLane:
    """One script's calls on one connection kept for them: ``EVALSHA`` packed by hiredis in one C call per command,
    a batch sent with one write, the answers read by the connection's parser (hiredis's, installed with
    ``redis[hiredis]``). Calls are one at a time (the admissions' group commit and the settlements' flush each
    batch what arrives meanwhile). A connection whose exchange was cut (an error, a timeout, a cancelled caller) is
    closed and opened again by the next call; a script the server lost (a restart) is loaded again and repeated."""

    def __init__(self, link: RedisLink, script: str) -> None:
        self.link = link
        self.script = script
        self.sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
        self._conn: AbstractConnection | None = None

    async def _connection(self) -> AbstractConnection:
        conn = self._conn
        if conn is None:
            conn = self._conn = self.link.client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        if not conn.is_connected:
            await conn.connect()
        return conn

    async def call(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """The script's answer to each ``(keys, args)``, in one write and one read of every answer; an error answer
        is returned as its exception, in its place."""
        conn = await self._connection()
        packed = b"".join(hiredis.pack_command(("EVALSHA", self.sha, len(keys), *keys, *args)) for keys, args in calls)
        done = False
        try:
            await conn.send_packed_command(packed, check_health=False)
            out: list[Any] = []
            for _ in calls:
                try:
                    out.append(await conn.read_response())
                except ResponseError as exc:  # an error answer: the connection is in step, the others follow
                    out.append(exc)
            done = True
        finally:
            if not done:  # answers may be left unread on it: never reuse it
                await conn.disconnect()
        if any(isinstance(r, NoScriptError) for r in out):
            await self.link.client.script_load(self.script)  # type: ignore[no-untyped-call]
            again = [i for i, r in enumerate(out) if isinstance(r, NoScriptError)]
            for i, r in zip(again, await self.call([calls[i] for i in again]), strict=True):
                out[i] = r
        return out

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect()


class SharedAdmission:
    """An admission of :class:`SharedLimiter`: its settlement is queued for the next flush."""

    __slots__ = ("_limiter", "done", "plan", "request_id", "tokens")

    def __init__(self, limiter: SharedLimiter, plan: Plan, request_id: str, tokens: int) -> None:
        self._limiter = limiter
        self.plan = plan
        self.request_id = request_id
        self.tokens = tokens
        self.done = False

    def settle(self, actual_tokens: int | None) -> None:
        if self.done:
            return
        self.done = True
        self._limiter._queue_settlement(self, (actual_tokens or 0) - self.tokens)


class SharedLimiter:
    """Rate limits in Redis (one :class:`RedisLink` per worker).

    :param link: the worker's Redis link.
    :param on_error: ``fail_open`` admits while Redis cannot be asked, ``fail_closed`` refuses.
    :param lease_s: how long a concurrency claim lasts when never settled.
    """

    _MAX_QUEUED = 100_000  # settlements waiting while Redis is away: beyond it they are dropped (and counted)
    FLUSH_DELAY_S = 0.005
    """A settlement waits this long for others to share its pipeline (one round trip for every request that ended
    meanwhile); a concurrency claim ends that much later, which only errs on the safe side."""

    def __init__(self, link: RedisLink, *, on_error: str = "fail_open", lease_s: float = 900.0) -> None:
        self.link = link
        self.on_error = on_error
        self.lease_ms = int(lease_s * 1000)
        self._admit = _ScriptLane(link, _ADMIT)
        self._settle = _ScriptLane(link, _SETTLE)
        self._queue: list[tuple[list[str], list[Any]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self.dropped_settlements = 0
        self._sending = False  # an admission call is on its way: others wait and go together after it
        self._waiting: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []

    def _keys(self, plan: Plan) -> list[str]:
        return [self.link.key("rl:" + c.name) for c in plan]

    async def admit(self, plan: Plan, request_id: str, tokens: int) -> Decision:
        if not self.link.available:
            return self._unavailable()
        args: list[Any] = [request_id, self.lease_ms]
        for counter in plan:
            args += ("c" if counter.kind == "concurrent" else "r", counter.limit,
                     tokens if counter.kind == "tokens" else 1)
        try:  # bounded by the connection's socket timeouts and the pool's wait (redis.timeout_s each)
            out = await self._evaluate(self._keys(plan), args)
        except REDIS_ERRORS as exc:
            self.link.failed(USER, exc)
            return self._unavailable()
        blocked, wait_ms = int(out[0]), int(out[1])
        states = tuple(CounterState(c, int(out[2 + 2 * i]), int(out[3 + 2 * i]) / 1000)
                       for i, c in enumerate(plan))
        if blocked:
            counter = plan[blocked - 1]
            return Decision(False, "limited", states, counter, max(wait_ms, 1) / 1000,
                            tokens if counter.kind == "tokens" else 1)
        return Decision(True, "allowed", states, admission=SharedAdmission(self, plan, request_id, tokens))

    async def _evaluate(self, keys: list[str], args: list[Any]) -> Any:
        """The admission script's answer. Alone, one call; while one is on its way, the requests that arrive
        wait and go together in one pipeline when it returns (group commit): still one round trip each, but
        one send, one read and one connection for many under concurrency."""
        if self._sending:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waiting.append((keys, args, future))
            return await future
        self._sending = True
        try:
            start = time.perf_counter()
            [out] = await self._admit.call([(keys, args)])
            self.link.observe(USER, time.perf_counter() - start)
            if isinstance(out, Exception):
                raise out
            while self._waiting:
                batch, self._waiting = self._waiting, []
                start = time.perf_counter()
                try:
                    results = await self._admit.call([(k, a) for k, a, _ in batch])
                except BaseException as exc:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                self.link.observe(USER, time.perf_counter() - start)
                for (_, _, future), result in zip(batch, results, strict=True):
                    if future.done():  # its request was cancelled meanwhile
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
            return out
        finally:
            self._sending = False
            # A failure of the first call leaves the waiting requests to find Redis down on their own.
            for _, _, future in self._waiting:
                if not future.done():
                    future.set_exception(ConnectionError("redis admission not sent"))
            self._waiting = []

    def _unavailable(self) -> Decision:
        if self.on_error == "fail_closed":
            return Decision(False, "redis_error_closed", retry_after_s=self.link.settings.retry_interval_s)
        return Decision(True, "redis_error_open")

    def _queue_settlement(self, admission: SharedAdmission, delta: int) -> None:
        if not delta and all(c.kind != "concurrent" for c in admission.plan):
            return  # the estimate was exact and no claim is held: nothing to tell Redis
        if len(self._queue) >= self._MAX_QUEUED:
            self.dropped_settlements += 1
            return
        args: list[Any] = [admission.request_id]
        for counter in admission.plan:
            args += ("c" if counter.kind == "concurrent" else "r", counter.limit,
                     delta if counter.kind == "tokens" else 0)
        self._queue.append((self._keys(admission.plan), args))
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush(), name="ratelimit-settle")

    async def _flush(self) -> None:
        """Send what is queued, one pipeline per round, until the queue is empty (a settlement queued during a
        round goes in the next). While Redis is down, settlements wait for it (bounded)."""
        try:
            await asyncio.sleep(self.FLUSH_DELAY_S)
            while self._queue:
                if not self.link.available:
                    await asyncio.sleep(self.link.settings.retry_interval_s)
                    continue
                batch, self._queue = self._queue, []
                start = time.perf_counter()
                try:
                    async with asyncio.timeout(self.link.settings.timeout_s * 4):
                        answers = await self._settle.call(batch)
                    failed = next((a for a in answers if isinstance(a, Exception)), None)
                    if failed is not None:
                        raise failed
                except REDIS_ERRORS as exc:
                    self.link.failed(USER, exc)
                    self._queue[:0] = batch[: self._MAX_QUEUED - len(self._queue)]
                    continue
                self.link.observe(USER, time.perf_counter() - start)
        finally:
            self._flushing = None

    async def close(self) -> None:
        """Send the queued settlements (bounded by the link's timeout), then stop."""
        task = self._flushing
        if task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(self.link.settings.timeout_s * 8):
                    await asyncio.shield(task)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._admit.close()
        await self._settle.close()
