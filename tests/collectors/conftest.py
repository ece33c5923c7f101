"""Fixtures of the collector tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from elasticsearch import AsyncElasticsearch


@pytest.fixture
async def es(es_url: str) -> AsyncIterator[AsyncElasticsearch]:
    """A client of the test Elasticsearch, closed after the test."""
    client = AsyncElasticsearch(es_url)
    try:
        yield client
    finally:
        await client.close()
