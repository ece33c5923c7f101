"""Collector SDK without a broker: the harness, the file sink's files, config validation and name resolution."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import Field

from collectors import BadEvent, BadEvents, ConfigError, DataCollector, RetryLater
from collectors.config import validate_collector_config
from collectors.registry import BUILTINS, resolve_collector
from collectors.sinks.file import FileCollector, repair_torn_tail
from collectors.testing import CollectorHarness
from gateway_tap.settings import ConfigFileError, Section, parse_config
from schemas import EVENT_TYPES, Analytics, BudgetUsage, encode_event
from tests.support.events import sample_events


def analytics(n: int, model: str = "m") -> list[Analytics]:
    return [Analytics(gateway_id="g", request_id=f"r{i}", vendor="openai", model=model, latency_ms=1.0,
                      status_code=200) for i in range(n)]


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def lines(directory: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(directory.iterdir()):
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        out += [orjson.loads(line) for line in data.splitlines()]
    return out


async def test_file_collector_writes_raw_values_one_directory_per_type(tmp_path: Path) -> None:
    events = sample_events()
    async with CollectorHarness(FileCollector, {"directory": str(tmp_path)}) as h:
        await h.feed(events)
        await h.flush()
    # handed over one batch per type, like the runtime does
    assert [e.id for e in h.flushed] == [e.id for t in EVENT_TYPES for e in events if e.type == t]
    assert names(tmp_path) == ["analytics", "budget_usage", "proxy_log"]
    written = (tmp_path / "proxy_log" / "events.current.jsonl").read_bytes()
    assert written == b"".join(encode_event(e) + b"\n" for e in events if e.type == "proxy_log")


async def test_file_collector_rotates_by_size_and_compresses(tmp_path: Path) -> None:
    events = analytics(40)
    config = {"directory": str(tmp_path), "rotate_bytes": 2048, "compress": True, "file_prefix": "w1"}
    async with CollectorHarness(FileCollector, config) as h:
        for i in range(0, 40, 4):
            await h.feed(events[i:i + 4])
            await h.flush()
    names_ = names(tmp_path / "analytics")
    assert "w1.current.jsonl" in names_
    assert len([n for n in names_ if n.endswith(".jsonl.gz")]) >= 3
    assert not [n for n in names_ if n.endswith(".tmp")]
    assert [r["id"] for r in lines(tmp_path / "analytics")] == sorted(e.id for e in events)


async def test_file_collector_rotates_when_the_time_window_changes(tmp_path: Path) -> None:
    async with CollectorHarness(FileCollector, {"directory": str(tmp_path)}) as h:
        collector = h.collector
        assert isinstance(collector, FileCollector)
        await h.feed(analytics(2))
        collector.segments["analytics"].window -= 1  # as if the hour had changed since the segment opened
        await h.feed(analytics(3))
        await h.flush()
    # "events-<ts>" sorts before "events.current"
    sealed, current = (tmp_path / "analytics" / n for n in names(tmp_path / "analytics"))
    assert current.name == "events.current.jsonl" and sealed.name.startswith("events-2")
    assert (len(sealed.read_bytes().splitlines()), len(current.read_bytes().splitlines())) == (2, 3)


async def test_torn_last_line_is_cut_and_segment_sealed_on_start(tmp_path: Path) -> None:
    good = analytics(3)
    current = tmp_path / "analytics" / "events.current.jsonl"
    current.parent.mkdir()
    current.write_bytes(b"".join(encode_event(e) + b"\n" for e in good[:2]) + encode_event(good[2])[:25])
    async with CollectorHarness(FileCollector, {"directory": str(tmp_path)}) as h:
        await h.feed(good[2:])
        await h.flush()
    assert [r["id"] for r in lines(tmp_path / "analytics")] == [e.id for e in good]
    assert repair_torn_tail(current) == 0


def test_repair_without_any_newline_empties_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b'{"id": "a"')
    assert repair_torn_tail(path) == 10
    assert path.read_bytes() == b""


async def test_event_with_raw_newlines_stays_on_one_line(tmp_path: Path) -> None:
    event = analytics(1)[0]
    pretty = orjson.dumps(orjson.loads(encode_event(event)), option=orjson.OPT_INDENT_2)
    async with CollectorHarness(FileCollector, {"directory": str(tmp_path)}) as h:
        await h.feed_raw([pretty, b"not json"], "analytics")
        await h.flush()
    assert [r["id"] for r in lines(tmp_path / "analytics")] == [event.id]
    assert h.undecodable and "invalid JSON" in h.undecodable[0]


class Picky(DataCollector):
    """Rejects per event (BadEvent), per batch (BadEvents) or asks for a retry, depending on the model."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def handle_analytics(self, event: Analytics) -> None:
        if event.model == "bad":
            raise BadEvent("bad model")
        self.seen.append(event.id)

    async def handle_budget_usage_batch(self, events: Sequence[BudgetUsage]) -> None:
        if any(e.model == "retry" for e in events):
            raise RetryLater("store down", retry_after=1)
        raise BadEvents({events[0].id: "first is bad"})


class BareBadEvent(DataCollector):
    """A batch handler that raises BadEvent without saying which event: the runtime isolates it."""

    async def handle_analytics_batch(self, events: Sequence[Analytics]) -> None:
        if any(e.model == "bad" for e in events):
            raise BadEvent("contains bad")


async def test_harness_reports_rejections_and_propagates_retry_later() -> None:
    good, bad = analytics(3), analytics(1, model="bad")
    async with CollectorHarness(Picky) as h:
        await h.feed([good[0], bad[0], *good[1:]])
        await h.flush()
        assert h.rejected == {bad[0].id: "bad model"}
        assert [e.id for e in h.flushed] == [e.id for e in good]
        usage = sample_events()[3]
        await h.feed([usage])
        assert h.rejected[usage.id] == "first is bad"
        retry = usage.model_copy(update={"model": "retry", "id": "u2"})
        with pytest.raises(RetryLater):
            await h.feed([retry])
    async with CollectorHarness(BareBadEvent) as h2:
        await h2.feed([*good, *bad])
        assert h2.rejected == {bad[0].id: "contains bad"}
        assert [e.id for e in h2.handed] == [e.id for e in good]


def test_consumed_types_declared_or_derived() -> None:
    assert FileCollector.consumed_types() == ("proxy_log", "analytics", "budget_usage")
    assert Picky.consumed_types() == ("analytics", "budget_usage")
    assert BareBadEvent.consumed_types() == ("analytics",)


def test_config_errors_name_the_key_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        validate_collector_config("file", FileCollector,
                                  {"directory": 3, "fsync": "sometimes", "colour": "red"})
    lines_ = str(err.value).splitlines()
    assert lines_ == ["collectors.file.config.directory: Input should be a valid string",
                      "collectors.file.config.fsync: Input should be 'always' or 'never'",
                      "collectors.file.config.colour: Extra inputs are not permitted"]
    filled = validate_collector_config("file", FileCollector, {"directory": "d"})
    assert filled["fsync"] == "always" and filled["rotate_interval_s"] == 3600
    with pytest.raises(ConfigFileError, match=r"collectors\.file\.batch\.max_events: Input should be greater"):
        parse_config({"collectors": {"file": {"batch": {"max_events": 0}}}})
    cfg = parse_config({"collectors": {"file": {"group_instance_id": "f1", "config": {"directory": "x"}}}})
    assert cfg.collectors["file"].group_instance_id == "f1"


class SchemaOnly(DataCollector):
    """A collector declaring its config the pre-pydantic way, as JSON Schema: still validated as before."""

    event_types = ("analytics",)
    config_schema = {"type": "object", "additionalProperties": False, "required": ["url"],
                     "properties": {"url": {"type": "string"}, "retries": {"type": "integer", "default": 3}}}


class WithModel(DataCollector):
    class Settings(Section):
        url: str
        retries: int = Field(default=3, ge=0, description="How often to try.")

    event_types = ("analytics",)
    Config = Settings


def test_json_schema_collectors_still_validate_and_get_top_level_defaults() -> None:
    assert validate_collector_config("s", SchemaOnly, {"url": "u"}) == {"url": "u", "retries": 3}
    with pytest.raises(ConfigError) as err:
        validate_collector_config("s", SchemaOnly, {"retries": "x"})
    assert str(err.value).splitlines() == ["collectors.s.config: 'url' is a required property",
                                           "collectors.s.config.retries: 'x' is not of type 'integer'"]


def test_a_config_model_is_the_one_declaration_and_the_schema_derives_from_it() -> None:
    assert WithModel.config_schema == WithModel.Settings.model_json_schema()
    assert WithModel.config_schema["properties"]["retries"]["description"] == "How often to try."
    assert validate_collector_config("m", WithModel, {"url": "u"}) == {"url": "u", "retries": 3}
    with pytest.raises(ConfigError, match=r"^collectors\.m\.config\.retries: Input should be greater than or "
                                          r"equal to 0$"):
        validate_collector_config("m", WithModel, {"url": "u", "retries": -1})
    for builtin in BUILTINS:
        cls = resolve_collector(builtin)
        assert cls.Config is not None and cls.config_schema == cls.Config.model_json_schema(), builtin


def test_a_renamed_key_fails_naming_its_new_name() -> None:
    with pytest.raises(ConfigError, match=r"^collectors\.es\.config\.request_timeout: renamed to "
                                          r"request_timeout_s$"):
        validate_collector_config("es", resolve_collector("elasticsearch"), {"request_timeout": 30})
    assert validate_collector_config("es", resolve_collector("elasticsearch"),
                                     {"request_timeout_s": 5})["request_timeout_s"] == 5


def test_resolve_builtin_module_class_and_errors() -> None:
    assert resolve_collector("file") is FileCollector
    assert resolve_collector("tests.collectors.test_collector_sdk:Picky") is Picky
    with pytest.raises(ConfigError, match="unknown collector 'nope'"):
        resolve_collector("nope")
    with pytest.raises(ConfigError, match="cannot import"):
        resolve_collector("no_such_module_xyz:C")
    with pytest.raises(ConfigError, match="not a DataCollector"):
        resolve_collector("tests.collectors.test_collector_sdk:analytics")


