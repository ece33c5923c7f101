"""An empty fetch answered at once waits out the rest of ``fetch_max_wait_ms`` on the client instead.

A Kafka broker parks a fetch that has nothing to return for ``fetch.max.wait.ms`` (KIP-227 aside, that is
the protocol's long poll), so an idle consumer sends about two fetches a second. A broker that answers an
empty fetch at once (noida-db, the embedded test bed of ``gateway-tap up`` and the suite) makes aiokafka's
fetcher send the next one immediately: an idle collector spun at ~55% of a core. Here the fetch task of a
consumer sleeps out what the broker did not wait, at most ``cap_ms``, before it ends, so the fetcher sends
no new fetch to that broker meanwhile.

On a broker that waits, an empty fetch already took ``fetch_max_wait_ms``: nothing is left to sleep and
nothing changes. A fetch that returned records never sleeps. A record that reaches a non-waiting broker
during the sleep is fetched when it ends: later by at most ``cap_ms``, never later than ``fetch_max_wait_ms``
after the previous fetch (``tests/collectors/test_idle_fetch.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiokafka import AIOKafkaConsumer

DEFAULT_CAP_MS = 100


def wait_out_empty_fetches(consumer: AIOKafkaConsumer, cap_ms: float = DEFAULT_CAP_MS) -> bool:
    """Install the client-side wait on a started ``consumer``; False when its fetcher is not the expected one.

    aiokafka has no setting for this; its fetcher starts one ``_proc_fetch_request`` task per broker and sends
    that broker nothing new until the task ends, so wrapping that method of this one fetcher instance is the
    narrowest place to wait (no other consumer in the process is touched).
    """
    fetcher: Any = getattr(consumer, "_fetcher", None)
    original = getattr(fetcher, "_proc_fetch_request", None)
    max_wait_s = getattr(fetcher, "_fetch_max_wait_ms", None)
    if original is None or max_wait_s is None or getattr(original, "_waits_out_empty_fetches", False):
        return False
    max_wait_s /= 1000
    cap_s = cap_ms / 1000
    loop = asyncio.get_running_loop()

    async def proc_fetch_request(assignment: Any, node_id: int, request: Any) -> bool:
        started = loop.time()
        got_records: bool = await original(assignment, node_id, request)
        if not got_records:
            left_s = max_wait_s - (loop.time() - started)
            if left_s > 0.001:
                # Cancelled when the fetcher closes or the assignment changes; like the method it wraps, the
                # task then ends quietly (aiokafka awaits it after cancelling it and expects no error).
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(min(left_s, cap_s))
        return got_records

    proc_fetch_request._waits_out_empty_fetches = True  # type: ignore[attr-defined]
    fetcher._proc_fetch_request = proc_fetch_request
    return True
