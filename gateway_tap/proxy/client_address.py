"""Who the client is when the tap sits behind load balancers: ``tap.trusted_proxies``.

A connection from a trusted proxy carries the client's address in ``X-Forwarded-For``, which anyone can also
write. The header is read right to left, each hop appended by the proxy it reached: the first address that is
not itself a trusted proxy is the client (what nginx's ``real_ip_recursive`` and most load balancers' guides
do). An entry that is not an IP address ends the walk at the hop that wrote it: nothing left of an untrusted
or garbled entry is believed. A connection from anywhere else is its own peer, whatever it sends.
``X-Forwarded-For`` and ``Forwarded`` are never forwarded upstream either way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from multidict import CIMultiDictProxy

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_HOPS = 32
"""Entries of ``X-Forwarded-For`` looked at, from the right (a longer chain is someone writing it by hand)."""


class ClientAddresses:
    """Resolves the client address of a request (see the module)."""

    __slots__ = ("_networks", "_peers")

    _MAX_PEERS = 1024  # connections come from a handful of proxies; a scan of the whole internet cannot grow this

    def __init__(self, trusted: Sequence[IPNetwork]) -> None:
        self._networks = tuple(trusted)
        self._peers: dict[str, bool] = {}

    def _trusted(self, address: str) -> bool:
        known = self._peers.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                known = False
            else:
                known = any(ip in net for net in self._networks)
            if len(self._peers) < self._MAX_PEERS:
                self._peers[address] = known
        return known

    def client_of(self, peer: str | None, headers: CIMultiDictProxy[str]) -> str | None:
        """The client's address of a request that came from ``peer`` with ``headers``."""
        if peer is None or not self._trusted(peer):
            return peer
        chain = ",".join(headers.getall("x-forwarded-for", ())).split(",")
        hop = peer
        for entry in reversed(chain[-MAX_HOPS:]):
            try:
                address = str(ipaddress.ip_address(entry.strip()))
            except ValueError:
                return hop
            hop = address
            if not self._trusted(address):
                return address
        return hop
