"""Cuttable TCP links for fault runs: :class:`TcpLink` forwards bytes as they are (HTTP: Elasticsearch);
:class:`BrokerLink` sits between one Kafka client (the tap) and a single-node broker.

A Kafka client only bootstraps through the address it is given: the Metadata response
names the broker's advertised ``host:port`` and the client connects there directly.
noida-db advertises the address it binds, so a plain TCP proxy would be bypassed after
the first round trip. This link therefore rewrites the broker's port in ``Metadata``
and ``FindCoordinator`` responses to its own: every connection of the client then goes
through the link, and :meth:`BrokerLink.cut` makes the broker unreachable for that client
alone while other clients (the collectors) keep talking to it directly.

The rewrite swaps the 4-byte port that follows the advertised host string, in both the
classic (int16 length) and the flexible (unsigned varint length + 1) string encodings;
the frame length does not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

METADATA, FIND_COORDINATOR = 3, 10


class TcpLink:
    """Listens on ``listen_port`` and forwards to ``host:target_port``; :meth:`cut` / :meth:`restore`.

    While cut, existing connections are closed and new ones are refused (nothing listens): to the
    client the server is gone, while the server itself keeps running (and keeps what it stored).
    """

    def __init__(self, host: str, target_port: int, listen_port: int) -> None:
        self.host = host
        self.target_port = target_port
        self.listen_port = listen_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.listen_port}"

    @property
    def is_cut(self) -> bool:
        return self._server is None

    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, self.host, self.listen_port, reuse_address=True)

    async def cut(self) -> None:
        """Stop listening and close every open connection (both sides)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def restore(self) -> None:
        await self.start()

    async def stop(self) -> None:
        await self.cut()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            target_r, target_w = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            client_w.close()
            return
        self.connections += 1
        self._writers.update((client_w, target_w))
        up, down = self._pumps(client_r, target_w, target_r, client_w)
        self._tasks.update((up, down))
        try:
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
                self._tasks.discard(task)
            for writer in (client_w, target_w):
                writer.close()
                self._writers.discard(writer)

    def _pumps(self, client_r: asyncio.StreamReader, target_w: asyncio.StreamWriter,
               target_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
               ) -> tuple[asyncio.Task[None], asyncio.Task[None]]:
        return asyncio.create_task(_pipe(client_r, target_w)), asyncio.create_task(_pipe(target_r, client_w))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


class BrokerLink(TcpLink):
    """A :class:`TcpLink` to a Kafka broker that rewrites the advertised port (see the module)."""

    def __init__(self, host: str, broker_port: int, listen_port: int) -> None:
        super().__init__(host, broker_port, listen_port)
        encoded = host.encode()
        old, new = struct.pack(">i", broker_port), struct.pack(">i", listen_port)
        self._swaps = [
            (struct.pack(">h", len(encoded)) + encoded + old, struct.pack(">h", len(encoded)) + encoded + new),
            (bytes([len(encoded) + 1]) + encoded + old, bytes([len(encoded) + 1]) + encoded + new),
        ]

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.listen_port}"

    def _pumps(self, client_r: asyncio.StreamReader, target_w: asyncio.StreamWriter,
               target_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
               ) -> tuple[asyncio.Task[None], asyncio.Task[None]]:
        pending: dict[int, int] = {}  # correlation id -> api key << 16 | version, of requests awaiting a response
        return (asyncio.create_task(self._requests(client_r, target_w, pending)),
                asyncio.create_task(self._responses(target_r, client_w, pending)))

    @staticmethod
    async def _frame(reader: asyncio.StreamReader) -> bytes:
        size = await reader.readexactly(4)
        return size + await reader.readexactly(struct.unpack(">i", size)[0])

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        pending: dict[int, int]) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                frame = await self._frame(reader)
                api_key, version, correlation = struct.unpack(">hhi", frame[4:12])
                pending[correlation] = (api_key << 16) | version
                writer.write(frame)
                await writer.drain()

    async def _responses(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         pending: dict[int, int]) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                frame = await self._frame(reader)
                (correlation,) = struct.unpack(">i", frame[4:8])
                request = pending.pop(correlation, None)
                api_key, version = (request >> 16, request & 0xFFFF) if request is not None else (-1, -1)
                frame = await self._response(api_key, version, frame)
                writer.write(frame)
                await writer.drain()

    async def _response(self, api_key: int, version: int, frame: bytes) -> bytes:
        """The response ``frame`` to a request of ``api_key``/``version`` as the client gets it: Metadata and
        FindCoordinator answers advertise this link's port. Subclasses inject faults here."""
        if api_key in (METADATA, FIND_COORDINATOR):
            for old, new in self._swaps:
                frame = frame.replace(old, new)
        return frame
