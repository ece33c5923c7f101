"""An OTLP/HTTP receiver for the tests: it decodes the real OTLP protobuf messages (opentelemetry-proto) that
the otlp collectors send, keeps them, and answers what the test scripts (a status per signal, in order).

No OpenTelemetry Collector can be installed on these machines, so this is the test double of one: it checks
the wire format (protobuf of the OTLP request messages, gzip, content type, paths) against the same generated
classes a Collector is built from, not against our own encoder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from gateway_tap.dev.servers import free_port

REQUESTS = {"traces": ExportTraceServiceRequest, "metrics": ExportMetricsServiceRequest,
            "logs": ExportLogsServiceRequest}
RESPONSES = {"traces": ExportTraceServiceResponse, "metrics": ExportMetricsServiceResponse,
             "logs": ExportLogsServiceResponse}


@dataclass
class Receiver:
    url: str
    received: dict[str, list[Any]] = field(default_factory=lambda: {"traces": [], "metrics": [], "logs": []})
    answers: dict[str, list[int]] = field(default_factory=lambda: {"traces": [], "metrics": [], "logs": []})
    """Per signal, statuses to answer next (then 200); a test appends to script failures."""
    headers: list[dict[str, str]] = field(default_factory=list)

    def spans(self) -> list[Any]:
        return [s for r in self.received["traces"] for rs in r.resource_spans for ss in rs.scope_spans
                for s in ss.spans]

    def metrics(self) -> list[Any]:
        return [m for r in self.received["metrics"] for rm in r.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics]

    def log_records(self) -> list[Any]:
        return [lr for r in self.received["logs"] for rl in r.resource_logs for sl in rl.scope_logs
                for lr in sl.log_records]


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def attributes(item: Any) -> dict[str, Any]:
    """An item's attributes as a dict (the exact names and typed values the receiver decoded)."""
    return {kv.key: value_of(kv.value) for kv in item.attributes}


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    receiver = Receiver(f"http://127.0.0.1:{port}")

    async def handle(request: web.Request) -> web.Response:
        signal = request.match_info["signal"]
        receiver.headers.append(dict(request.headers))
        if request.headers.get("content-type") != "application/x-protobuf":
            return web.Response(status=415)
        answers = receiver.answers[signal]
        if answers:
            status = answers.pop(0)
            return web.Response(status=status, body=b"scripted failure", headers={"retry-after": "1"})
        body = await request.read()  # aiohttp has undone a Content-Encoding: gzip (the test checks the header)
        receiver.received[signal].append(REQUESTS[signal].FromString(body))
        return web.Response(body=RESPONSES[signal]().SerializeToString(), content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/{signal}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield receiver
    finally:
        await runner.cleanup()
