"""The plugin SDK: one typed async Protocol per hook capability, and the objects hooks see.

A plugin is a class with a no-argument constructor that implements any subset of
the capabilities below (checked structurally, no base class needed):

- :class:`PreAuthHook` runs before authentication (rate limits, IP filters);
- :class:`AuthHook` replaces the built-in key check;
- :class:`PostAuthHook` runs once the app is known (firewalls, enrichment);
- :class:`ResponseHeadersHook` sees the response's status and headers before anything is sent;
- :class:`ResponseBodyHook` sees a whole non-streamed body before anything is sent, and may
  change it or replace the answer with an error (output moderation);
- :class:`StreamEventHook` sees each server-sent event of a streamed response, parsed (OpenAI
  ``data:`` chunks and ``[DONE]``, Anthropic typed events), and may rewrite or drop it, or end the
  stream with an error event the clients' SDKs raise;
- :class:`ResponseChunkHook` sees the raw bytes of every body write (each streamed chunk as read
  from the upstream, or the whole body once) and returns the bytes to send; with
  :class:`ResponseEndHook` it is told when the body ends, to send what it held back;
- :class:`EndpointProvider` serves its own routes under ``/plugins/{name}/...`` (path patterns with
  parameters, any method; authenticated like ``/llm/`` unless ``public``);
- :class:`ConfigSchemaProvider` declares a JSON Schema its ``config`` must match.

Optional lifecycle: ``async def initialize(self, config, services)`` after the
config validated, ``async def close(self)`` at shutdown (or, after a configuration
reload removed or replaced it, once no request uses it any more),
``async def on_config_change(self, config)``: when present, a reload that changes
the plugin's ``config`` calls it (after validating the new config) instead of
replacing the instance with a freshly initialised one, and ``async def health(self)``
(:class:`HealthCheck`), which feeds the tap's ``/readyz``.

A hook returns ``None`` (or :meth:`HookResult.proceed`) to continue, may mutate
the request/response it is given or return :meth:`HookResult.modify`, and stops
the request with :meth:`HookResult.stop`. The rules of the chain live in
:mod:`gateway_tap.plugins.chain`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import orjson
from multidict import CIMultiDict

# The services shared with collectors live below the SDK; plugin authors import them from here.
from gateway_tap.services import AppInfo as AppInfo
from gateway_tap.services import GatewayServices as GatewayServices
from gateway_tap.services import KeyValueStore as KeyValueStore
from gateway_tap.services import LLMInfo as LLMInfo
from gateway_tap.services import Price as Price
from gateway_tap.services import read_only

if TYPE_CHECKING:
    from aiohttp import web


_UNPARSED: Any = object()

# "Contains nothing outside the set" (not "^[set]*$": Python's $ also matches before a final newline).
HEADER_NAME_SCHEMA: dict[str, Any] = {"type": "string", "minLength": 1,
                                      "not": {"pattern": r"[^!#$%&'*+.^_`|~0-9A-Za-z-]"}}
"""JSON Schema of an HTTP header name (an RFC 9110 token), for a plugin's ``config_schema``."""
HEADER_VALUE_SCHEMA: dict[str, Any] = {"type": "string", "maxLength": 4096, "not": {"pattern": r"[^\t\x20-\x7e]"}}
"""JSON Schema of a header value a plugin sends (visible ASCII, space and tab; never CR, LF or NUL, which would
make every request carrying it fail): a config with one is refused when the file loads and by the admin API."""
HEADERS_SCHEMA: dict[str, Any] = {"type": "object", "propertyNames": HEADER_NAME_SCHEMA,
                                  "additionalProperties": HEADER_VALUE_SCHEMA}
"""JSON Schema of a ``{name: value}`` map of headers (:data:`HEADER_NAME_SCHEMA`, :data:`HEADER_VALUE_SCHEMA`)."""


class TapRequest:
    """The client request as the hooks see it; changes are forwarded upstream.

    ``path`` is the part after ``/llm/{llm_id}/`` (e.g. ``v1/chat/completions``).
    The JSON body is parsed lazily and at most once (:meth:`json`).
    """

    __slots__ = ("_body", "_json", "client_address", "headers", "method", "path", "query_string")

    def __init__(self, method: str, path: str, query_string: str, headers: CIMultiDict[str], body: bytes,
                 client_address: str | None = None) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self._body = body
        self._json: Any = _UNPARSED
        self.client_address = client_address

    @property
    def body(self) -> bytes:
        return self._body

    @body.setter
    def body(self, value: bytes) -> None:
        self._body = value
        self._json = _UNPARSED

    def json(self) -> Any:
        """The parsed JSON body (``None`` when empty). Raises ``orjson.JSONDecodeError`` when malformed."""
        if self._json is _UNPARSED:
            self._json = orjson.loads(self._body) if self._body else None
        return self._json

    def set_json(self, value: Any) -> None:
        """Replace the body with ``value`` serialised as JSON."""
        self._body = orjson.dumps(value)
        self._json = value


@dataclass(slots=True)
class TapResponse:
    """The upstream response as response hooks see it, before anything is sent to the client."""

    status: int
    headers: CIMultiDict[str]
    streamed: bool


NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: returned by an :class:`AuthHook`.

    ``claims`` are what the credential said about the caller (e.g. a verified JWT's claims); later
    hooks and endpoint handlers read them as ``ctx.claims``, a read-only mapping (nested objects and
    lists are read-only too).
    """

    app_id: str
    user_id: str | None = None
    claims: Mapping[str, Any] = field(default_factory=lambda: NO_CLAIMS)

    def __post_init__(self) -> None:
        if self.claims is not NO_CLAIMS:
            object.__setattr__(self, "claims", read_only(self.claims))


@dataclass(slots=True)
class HookResult:
    """What a hook decided. Use the constructors, not the fields."""

    action: Literal["continue", "stop", "respond", "drop"] = "continue"
    status: int = 200
    code: str | None = None
    message: str = ""
    body: bytes | None = None
    headers: Mapping[str, str] | None = None
    metadata: Mapping[str, str] | None = None
    cache_hit: bool = False
    charge: bool = True

    @classmethod
    def proceed(cls) -> HookResult:
        return cls()

    @classmethod
    def modify(cls, *, headers: Mapping[str, str] | None = None, body: bytes | None = None,
               metadata: Mapping[str, str] | None = None) -> HookResult:
        """Continue after setting ``headers`` (on the request or response), replacing ``body`` and adding
        ``metadata`` (string tags carried into the events)."""
        return cls(headers=headers, body=body, metadata=metadata)

    @classmethod
    def stop(cls, status: int, message: str, *, code: str | None = None, body: bytes | None = None,
             headers: Mapping[str, str] | None = None) -> HookResult:
        """End the request with ``status``. Without ``body`` the client gets the standard error JSON."""
        return cls("stop", status, code, message, body, headers)

    @classmethod
    def respond(cls, status: int, body: bytes, *, headers: Mapping[str, str] | None = None,
                cache_hit: bool = False, charge: bool = True) -> HookResult:
        """Answer the request with this response instead of calling the upstream.

        Unlike :meth:`stop` it is a success, accounted like an upstream answer: the response
        hooks run on it, its ``usage`` counts in analytics, and the events record zero upstream
        latency and ``cache_hit``. ``charge=False`` records no cost and no budget usage for it
        (a response cache serving an answer that was already paid for).

        As for an upstream answer, the content type decides how it is sent: with
        ``content-type: text/event-stream`` ``body`` is a whole server-sent event stream and goes
        out as a stream: the stream event hooks see its parsed events, the chunk hooks what they let
        through, and usage is read from its events (an OpenAI usage chunk the client did not ask for
        is withheld, as from the upstream). Anything else (default ``application/json``) is a whole
        answer: the body hooks, then the chunk hooks once.
        """
        return cls("respond", status, body=body, headers=headers, cache_hit=cache_hit, charge=charge)

    @classmethod
    def drop(cls) -> HookResult:
        """From :meth:`StreamEventHook.on_stream_event`: send nothing for this event (later hooks skip it too)."""
        return cls("drop")


class StreamEvent:
    """One server-sent event of a streamed response, as :class:`StreamEventHook` hooks see it.

    ``data`` is the event's data (lines joined by ``\n``): a JSON chunk, or ``[DONE]`` at the end of an
    OpenAI stream; ``event`` is the event type (Anthropic: ``message_start``, ``content_block_delta``, ...;
    None for OpenAI). Change ``data`` (or :meth:`set_json`) / ``event`` in place, or build a new one; an
    event nobody changed is forwarded byte for byte as the upstream sent it.
    """

    __slots__ = ("_data", "_event", "_json", "id", "raw")

    def __init__(self, data: str, event: str | None = None, id: str | None = None,
                 raw: bytes | None = None) -> None:
        self._data = data
        self._event = event
        self._json: Any = _UNPARSED
        self.id = id
        self.raw = raw
        """The bytes the upstream sent for this event (``None`` once it changed): what is forwarded as is."""

    @property
    def data(self) -> str:
        return self._data

    @data.setter
    def data(self, value: str) -> None:
        self._data = value
        self._json = _UNPARSED
        self.raw = None

    @property
    def event(self) -> str | None:
        return self._event

    @event.setter
    def event(self, value: str | None) -> None:
        self._event = value
        self.raw = None

    @property
    def done(self) -> bool:
        """True for OpenAI's end-of-stream marker ``data: [DONE]``."""
        return self._data == "[DONE]"

    def json(self) -> Any:
        """The data parsed as JSON (parsed once); None for ``[DONE]`` or data that is not JSON."""
        if self._json is _UNPARSED:
            try:
                self._json = None if self.done else orjson.loads(self._data)
            except orjson.JSONDecodeError:
                self._json = None
        return self._json

    def set_json(self, value: Any) -> None:
        """Replace the data with ``value`` serialised as JSON."""
        self.data = orjson.dumps(value).decode()
        self._json = value

    def encode(self) -> bytes:
        """The event on the wire: the upstream's bytes when unchanged, else ``event:``/``id:``/``data:`` lines."""
        if self.raw is not None:
            return self.raw
        out = f"event: {self._event}\n" if self._event is not None else ""
        if self.id is not None:
            out += f"id: {self.id}\n"
        out += "".join(f"data: {line}\n" for line in self._data.split("\n"))
        return (out + "\n").encode()

    def __repr__(self) -> str:
        return f"StreamEvent(event={self._event!r}, data={self._data[:60]!r})"


ControlSink = Callable[[str, str, Mapping[str, Any]], str]
"""``(plugin, kind, payload) -> message id``: how :meth:`PluginServices.send_to_control` reaches the publisher."""


@dataclass(slots=True)
class PluginServices:
    """Services handed to a plugin at :func:`initialize` and on every context."""

    kv: KeyValueStore
    logger: logging.Logger
    gateway: GatewayServices
    plugin: str = ""
    control: ControlSink | None = None

    def send_to_control(self, kind: str, payload: Mapping[str, Any]) -> str:
        """Send ``payload`` (a JSON object) to the control plane: topic ``<prefix>.control``.

        The tap wraps it in the envelope (``id``, ``gateway_id``, ``emitted_at``, ``plugin``, ``kind``,
        see ``schemas/control.schema.json``) and hands it to the same non-blocking, spooled publisher
        as the events; collectors receive it in ``handle_control``. Returns the message id.

        :raises TypeError: ``payload`` is not JSON-serialisable.
        :raises RuntimeError: the plugin runs without a control channel.
        """
        if self.control is None:
            raise RuntimeError("no control channel: send_to_control works inside a tap or a PluginHarness")
        return self.control(self.plugin, kind, payload)


@dataclass(slots=True)
class HookContext:
    """Per request, per plugin view. ``metadata`` is shared by all hooks of one request and ends up in the events."""

    request_id: str
    llm_id: str
    vendor: str
    plugin: str
    config: Mapping[str, Any]
    services: PluginServices
    metadata: dict[str, str]
    app_id: str | None = None
    user_id: str | None = None
    model: str | None = None
    state: dict[str, Any] = field(default_factory=dict)
    """This plugin's state for this request: the same dict in each of its hooks (e.g. a cache key computed
    in ``post_auth`` and used in ``on_response_chunk``); other plugins never see it."""
    claims: Mapping[str, Any] = field(default_factory=lambda: NO_CLAIMS)
    """The :attr:`Identity.claims` of the auth hook that identified the caller (read-only; empty after the
    built-in key check)."""
    trace_id: str = ""
    """The request's W3C trace id (the caller's, from its ``traceparent``, or one the tap started)."""
    traceparent: str = ""
    """The tap's span of this request as a ``traceparent`` value: send it with a call the hook makes, so that
    call joins the trace as a child of the gateway's span."""

    @property
    def app(self) -> AppInfo | None:
        """The calling app as configured (``name``, ``allowed_llms``, ``metadata``: the file's ``apps[]`` entry or
        the admin API's), None before authentication or for an app id no configuration knows. Looked up when
        read, in the configuration in force: reading it costs nothing to hooks that do not."""
        return self.services.gateway.get_app(self.app_id) if self.app_id is not None else None

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """The plugin's logger bound to this request id."""
        return logging.LoggerAdapter(self.services.logger, {"plugin": self.plugin, "request_id": self.request_id})


HookOutcome = HookResult | None


@runtime_checkable
class PreAuthHook(Protocol):
    async def pre_auth(self, request: TapRequest, ctx: HookContext) -> HookOutcome: ...


@runtime_checkable
class AuthHook(Protocol):
    async def authenticate(self, request: TapRequest, ctx: HookContext) -> Identity | HookResult | None:
        """An :class:`Identity` accepts, ``HookResult.stop`` rejects, ``None`` defers to the next auth hook
        (and finally to the built-in key check)."""
        ...


@runtime_checkable
class PostAuthHook(Protocol):
    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookOutcome: ...


@runtime_checkable
class ResponseHeadersHook(Protocol):
    async def on_response_headers(self, response: TapResponse, ctx: HookContext) -> HookOutcome:
        """Before anything is sent: may change status/headers or stop with a different response."""
        ...


@runtime_checkable
class ResponseBodyHook(Protocol):
    async def on_response_body(self, response: TapResponse, body: bytes, ctx: HookContext) -> HookOutcome:
        """A whole non-streamed body (upstream's or a plugin's answer), before anything is sent.

        ``None`` sends it; :meth:`HookResult.modify` replaces the body (``body=``) and sets headers
        (``response.status`` may be changed in place); :meth:`HookResult.stop` sends the stop's error
        instead of the answer (e.g. ``403 content_blocked``).
        """
        ...


@runtime_checkable
class StreamEventHook(Protocol):
    async def on_stream_event(self, event: StreamEvent, ctx: HookContext) -> StreamEvent | HookResult | None:
        """Each parsed server-sent event of a streamed response, before it is sent.

        ``None`` sends the event (with any in-place change); a :class:`StreamEvent` is sent instead of it;
        :meth:`HookResult.drop` sends nothing for it; :meth:`HookResult.stop` ends the stream with a final
        error event in the vendor's format (the ``openai`` and ``anthropic`` SDKs raise it), after which
        nothing more of the upstream's answer is sent.
        """
        ...


@runtime_checkable
class ResponseChunkHook(Protocol):
    async def on_response_chunk(self, chunk: bytes, ctx: HookContext) -> bytes:
        """Before each body write, on the raw bytes; returns the bytes to send (``b""`` drops the chunk)."""
        ...


@runtime_checkable
class ResponseEndHook(Protocol):
    async def on_response_end(self, ctx: HookContext) -> bytes:
        """The end of a body, after its last chunk: the bytes this plugin's chunk hook held back (``b""``: none).

        For a chunk hook that buffers (text cut across two chunks): they are written before the body ends,
        after passing through the chunk hooks that run after this one. Called once per body that ends
        normally: a whole answer after its one chunk call, a stream after the upstream's end or after a stream
        stop's final error event; not after a stream broke off (the upstream failed, the client left, a hook
        failed). Only with :meth:`ResponseChunkHook.on_response_chunk` on the same plugin.
        """
        ...


@runtime_checkable
class ResponseHook(ResponseHeadersHook, ResponseChunkHook, Protocol):
    """Headers and raw chunks together (each of the two also works alone)."""


@dataclass(slots=True)
class EndpointContext(HookContext):
    """What an endpoint handler gets besides the request: :class:`HookContext` (``app_id``, ``user_id`` and
    ``claims`` of the authenticated caller, empty for a public endpoint; ``llm_id`` and ``vendor`` are
    empty) plus ``params``, the values of the path pattern's ``{parameters}``."""

    params: Mapping[str, str] = field(default_factory=dict)


EndpointHandler = Callable[["web.Request", EndpointContext], Awaitable["web.StreamResponse"]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A route a plugin serves at ``/plugins/{plugin name}/{path}``; the handler may stream.

    ``method`` is an HTTP method or ``"*"`` for any (a ``GET`` route also answers ``HEAD``). ``path``
    is an aiohttp route pattern below the plugin's prefix: ``"stats"``, ``"mcp/{session}"``,
    ``"files/{name:.+}"`` (a regular expression after the colon); the values are in ``ctx.params``.

    ``public=False`` (default): the caller authenticates as on ``/llm/`` (app key, or the auth hooks of the
    plugins attached to every LLM); ``True`` lets anyone call it. ``timeout_ms`` bounds the time until the
    handler starts its response (returns it, or prepares a streamed one), not the stream after it;
    ``on_error`` is what a handler that raises or times out before responding answers: ``fail_closed``
    ``500 plugin_failed``, ``fail_open`` ``503 plugin_unavailable`` with ``Retry-After`` (the failure is
    transient: retry). Both default to the plugin's ``timeout_ms`` / ``on_error``.
    """

    method: str
    path: str
    handler: EndpointHandler
    public: bool = False
    timeout_ms: float | None = None
    on_error: Literal["fail_closed", "fail_open"] | None = None


@runtime_checkable
class EndpointProvider(Protocol):
    def endpoints(self) -> list[Endpoint]: ...


@runtime_checkable
class HealthCheck(Protocol):
    async def health(self) -> bool | None:
        """Whether this plugin can serve (its store reachable, its model loaded): feeds the tap's ``/readyz``.

        ``True`` or ``None``: ready. ``False``, an exception (its message is the reason) or running past the
        plugin's ``timeout_ms``: not ready, and ``/readyz`` answers 503 naming the plugin. Called on every
        ``/readyz`` request, so keep it cheap (report a state kept up to date elsewhere, or cache).
        """
        ...


@runtime_checkable
class ConfigSchemaProvider(Protocol):
    def config_schema(self) -> Mapping[str, Any]:
        """A JSON Schema (draft 2020-12) for the plugin's ``config``."""
        ...

