"""The ``gateway-tap`` command line.

Each command imports its implementation lazily so ``gateway-tap --help`` stays
fast and a command's dependencies load only when it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from gateway_tap import __version__

if TYPE_CHECKING:
    from datetime import datetime

    from gateway_tap.settings import GatewayConfig


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gateway-tap")
def main() -> None:
    """LLM gateway tap: proxy, hooks, Kafka events and the collectors that export them."""


@main.command("mock-llm")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8090, show_default=True, type=int)
@click.option("--latency-ms", default=0.0, show_default=True, help="Delay before every response.")
@click.option("--chunk-delay-ms", default=0.0, show_default=True, help="Delay between streamed chunks.")
@click.option("--error-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of requests answered with --error-status.")
@click.option("--error-status", default=500, show_default=True, type=int)
def mock_llm(host: str, port: int, latency_ms: float, chunk_delay_ms: float, error_rate: float,
             error_status: int) -> None:
    """Serve the deterministic mock OpenAI/Anthropic upstream."""
    from gateway_tap.dev.mock_llm import MockOptions, run

    click.echo(f"mock LLM upstream on http://{host}:{port} (OpenAI /v1/chat/completions, Anthropic /v1/messages)")
    run(host, port, MockOptions(latency_ms, chunk_delay_ms, error_rate, error_status))


@main.command("hash-key")
@click.argument("key", required=False)
def hash_key(key: str | None) -> None:
    """Print the sha256 hash to put in an app's ``key_hashes`` (generates a new key when none is given)."""
    import secrets

    from gateway_tap.apps import hash_key as key_hash

    if key is None:
        key = "gt-" + secrets.token_urlsafe(32)
        click.echo(f"key:  {key}")
    click.echo(key_hash(key))


@main.command("serve")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="gateway-tap.yaml")
@click.option("--workers", type=click.IntRange(1, 64), help="Worker processes (default: tap.workers).")
@click.option("--port", type=int, help="Override tap.listen.port.")
def serve(config_path: str, workers: int | None, port: int | None) -> None:
    """Run the tap (reverse proxy, hooks, event publishing)."""
    from gateway_tap.proxy.server import serve as run
    from gateway_tap.settings import ConfigFileError

    try:
        raise SystemExit(run(config_path, workers, port))
    except ConfigFileError as exc:
        raise click.ClickException(str(exc)) from None


@main.command("check-config")
@click.argument("config_path", type=click.Path(dir_okay=False))
@click.option("--model", "models", multiple=True, metavar="NAME",
              help="Also warn when no price applies to this model on an LLM (repeatable).")
def check_config(config_path: str, models: tuple[str, ...]) -> None:
    """Validate a config file (including plugin configs and price settings); exit 1 listing each key path and
    problem. Warnings (on stderr) name LLMs where a model would cost 0."""
    from datetime import UTC, datetime

    from gateway_tap.ops.prices import books, warnings
    from gateway_tap.plugins.loader import validate_plugin_configs
    from gateway_tap.settings import ConfigFileError, load_config

    try:
        config = load_config(config_path)
    except ConfigFileError as exc:
        raise click.ClickException(str(exc)) from None
    problems = validate_plugin_configs(config.plugins) + config.tap.admin.environment_problems()
    found, price_problems = books(config)
    problems = [*problems, *price_problems]
    if problems:
        raise click.ClickException(str(ConfigFileError(config_path, problems)))
    for warning in warnings(config, found, models, datetime.now(UTC)):
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{config_path}: ok ({len(config.llms)} LLMs, {len(config.apps)} apps, {len(config.plugins)} plugins)")


@main.command("prices")
@click.argument("model")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="gateway-tap.yaml: what each of its LLMs charges (default: the catalog alone).")
@click.option("--llm", "llm_id", help="Only this LLM of the config.")
@click.option("--provider", default="openai", show_default=True, help="Catalog provider, without --config.")
@click.option("--at", "at", metavar="TIME", help="Prices in force at this RFC 3339 time (default: now).")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
def prices(model: str, config_path: str | None, llm_id: str | None, provider: str, at: str | None,
           as_json: bool) -> None:
    """What MODEL costs per token class, and where the price comes from (config override, catalog, '*')."""
    from datetime import UTC, datetime

    import orjson

    from gateway_tap.ops.prices import explain, format_explained

    when = datetime.fromisoformat(at) if at else datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        rows = explain(_load(config_path) if config_path else None, model, when, llm_id, provider)
    except (ValueError, KeyError) as exc:
        raise click.ClickException(str(exc)) from None
    if not rows:
        raise click.ClickException(f"no LLM {llm_id!r} in {config_path}")
    click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() if as_json else format_explained(rows))


@main.command("reprice")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="gateway-tap.yaml whose prices apply.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="Write one JSON line per event (stored and re-priced cost) here.")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, allow_dash=True))
def reprice_command(config_path: str, out_path: str | None, files: tuple[str, ...]) -> None:
    """Re-price analytics events (JSON Lines, .gz too; '-' or none: stdin) with the config's prices.

    Per LLM and stored price version: events, stored and re-priced totals. Events priced with the price
    version the config gives reproduce their cost exactly; exit 1 if one does not.
    """
    from gateway_tap.ops.prices import books, dump_rows, format_report, read_events, reprice_lines

    found, problems = books(_load(config_path))
    if problems:
        raise click.ClickException("\n".join(problems))
    report = reprice_lines(found, read_events(files), keep_rows=out_path is not None)
    if out_path:
        with open(out_path, "wb") as out:
            out.write(dump_rows(report.rows))
    click.echo(format_report(report))
    if not report.reproduced:
        raise SystemExit(1)


def _collector_port_options() -> list[click.Parameter]:
    from gateway_tap.dev.stack import BUILTIN_COLLECTORS

    return [click.Option([c.option, f"collector_port_{name}"], default=c.metrics_port, show_default=True, type=int,
                         help=f"Metrics port of the {name} collector.") for name, c in BUILTIN_COLLECTORS.items()]


class _UpCommand(click.Command):
    """``up``, whose metrics-port option per built-in collector comes from the stack's table
    (``gateway_tap.dev.stack.BUILTIN_COLLECTORS``), read only when ``up`` runs or shows its help."""

    _collector_options: list[click.Parameter] | None = None

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._collector_options is None:
            self._collector_options = _collector_port_options()
        params = super().get_params(ctx)
        at = next(i for i, p in enumerate(params) if p.name == "plain")
        return [*params[:at], *self._collector_options, *params[at:]]


@main.command("up", cls=_UpCommand)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True),
              help="Apps, LLMs, plugins, budgets and collectors to run (reloads follow its changes)  [default: the "
                   "demo config shipped in the package, gateway_tap/examples/gateway-tap.yaml]")
@click.option("--state-dir", default=".gateway-tap", show_default=True, type=click.Path(file_okay=False),
              help="Data, logs, the generated config, the local admin token and up.pids.")
@click.option("--demo-traffic", is_flag=True, help="Send a steady trickle of realistic requests through the tap.")
@click.option("--tap-port", default=8080, show_default=True, type=int)
@click.option("--admin-port", default=8081, show_default=True, type=int, help="The tap's admin API.")
@click.option("--kafka-port", default=9092, show_default=True, type=int)
@click.option("--es-port", default=9200, show_default=True, type=int)
@click.option("--mock-port", default=8090, show_default=True, type=int)
@click.option("--tap-metrics-port", default=9464, show_default=True, type=int, help="The tap's /metrics.")
@click.option("--plain", is_flag=True, help="Periodic summary lines instead of the live panel (default off a TTY).")
def up(config_path: str | None, state_dir: str, demo_traffic: bool, tap_port: int, admin_port: int, kafka_port: int,
       es_port: int, mock_port: int, tap_metrics_port: int, plain: bool, **collector_ports: int) -> None:
    """Run the whole local stack in the foreground: broker, Elasticsearch, mock LLM, tap (with its admin API),
    the built-in collectors and those of --config.

    Ctrl-C (also SIGTERM, SIGHUP) stops everything; a run after a crash first stops what the crashed one left
    behind.
    """
    from pathlib import Path

    from gateway_tap.dev.stack import LocalStack, Ports
    from gateway_tap.dev.up import run_stack
    from gateway_tap.examples import DEMO_CONFIG

    ports = Ports(tap_port, admin_port, kafka_port, es_port, mock_port,
                  {name.removeprefix("collector_port_"): port for name, port in collector_ports.items()},
                  tap_metrics=tap_metrics_port)
    stack = LocalStack(Path(config_path) if config_path else DEMO_CONFIG, Path(state_dir), ports)
    raise SystemExit(run_stack(stack, demo_traffic, interactive=False if plain else None))


@main.command("collect")
@click.argument("name")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="The gateway-tap YAML file.")
@click.option("--group-id", help="Consumer group (default: the config's, else <topic_prefix>.collector.NAME).")
@click.option("--group-instance-id", help="Static group membership id (overrides the config).")
@click.option("--log-level", default="INFO", show_default=True)
def collect(name: str, config_path: str | None, group_id: str | None, group_instance_id: str | None,
            log_level: str) -> None:
    """Run collector NAME (built-in, entry point, or module:Class) as a Kafka consumer group member."""
    import logging

    from collectors.runtime import build_runtime, run_collector
    from collectors.sdk import ConfigError
    from gateway_tap.settings import ConfigFileError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        runtime = build_runtime(name, config_path, group_id, group_instance_id)
    except (ConfigError, ConfigFileError) as exc:
        raise click.ClickException(str(exc)) from None
    raise SystemExit(run_collector(runtime))


def _scaffold(kind: str, name: str, directory: str) -> None:
    from gateway_tap.scaffold import ScaffoldError, next_steps, scaffold

    try:
        names, target = scaffold(kind, name, directory)  # type: ignore[arg-type]
    except ScaffoldError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(next_steps(names, target))


@main.command("new-collector")
@click.argument("name")
@click.option("--dir", "directory", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where to create the package folder.")
def new_collector(name: str, directory: str) -> None:
    """Scaffold a collector package NAME (entry point, config schema, README, passing tests)."""
    _scaffold("collector", name, directory)


@main.command("new-plugin")
@click.argument("name")
@click.option("--dir", "directory", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where to create the package folder.")
def new_plugin(name: str, directory: str) -> None:
    """Scaffold a tap plugin package NAME (entry point, config schema, README, passing tests)."""
    _scaffold("plugin", name, directory)


def _load(config_path: str) -> GatewayConfig:
    """The validated config file, or a ClickException naming each problem."""
    from gateway_tap.settings import ConfigFileError, load_config

    try:
        return load_config(config_path)
    except ConfigFileError as exc:
        raise click.ClickException(str(exc)) from None


@main.command("status")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="gateway-tap.yaml")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (with per-partition detail) for scripts.")
@click.option("--tap-url", "tap_urls", multiple=True, help="A tap's metrics listener, base or /metrics URL "
              "(repeatable; default: tap.metrics of the config).")
def status(config_path: str, as_json: bool, tap_urls: tuple[str, ...]) -> None:
    """Collector lag per topic, dead-letter counts, the taps' spools and budget use. Exit 2: Kafka unreachable."""
    from gateway_tap.ops.status import run_status

    raise SystemExit(run_status(_load(config_path), list(tap_urls), as_json))


@main.command("replay")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="gateway-tap.yaml")
@click.option("--collector", "name", required=True, help="Collector NAME to re-export through.")
@click.option("--from", "start", required=True, metavar="TIME|OFFSET",
              help="Offset (every partition), ISO 8601 time (naive = UTC), duration ago (30m, 2h, 7d), or earliest.")
@click.option("--to", "stop", metavar="TIME|OFFSET", help="Exclusive end, same forms (default: the end at start).")
@click.option("--types", "types", multiple=True, type=click.Choice(["proxy_log", "analytics", "budget_usage"]),
              help="Only these event types (repeatable; default: all the collector consumes).")
@click.option("--refresh-interval", "refresh_interval", metavar="INTERVAL",
              help="elasticsearch collector: refresh_interval of its existing indices during the replay (e.g. 30s, "
                   "-1); each index's own value is put back at the end.")
def replay(config_path: str, name: str, start: str, stop: str | None, types: tuple[str, ...],
           refresh_interval: str | None) -> None:
    """Re-export a range of a collector's topics through it, under a separate consumer group (backfill)."""
    from gateway_tap.ops.replay import run_replay

    raise SystemExit(run_replay(_load(config_path), name, start, stop, list(types),  # type: ignore[arg-type]
                                refresh_interval))


@main.group("lake")
def lake() -> None:
    """The lake collector's Parquet output: compaction, and external-table definitions for query engines."""


@lake.command("compact")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="gateway-tap.yaml")
@click.option("--collector", "name", default="lake", show_default=True, help="The lake collector's NAME.")
@click.option("--before", required=True, type=click.DateTime(formats=["%Y-%m-%d"]),
              help="Compact the days before this date (UTC, YYYY-MM-DD).")
def lake_compact(config_path: str, name: str, before: datetime) -> None:
    """Merge each hour's small objects (per Kafka partition) into one; never loses or doubles a row."""
    from collectors.sdk import ConfigError
    from gateway_tap.ops.lake import run_compact

    try:
        raise SystemExit(run_compact(_load(config_path), name, before.date()))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@lake.command("ddl")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="gateway-tap.yaml")
@click.option("--collector", "name", default="lake", show_default=True, help="The lake collector's NAME.")
@click.option("--engine", required=True, type=click.Choice(["duckdb", "clickhouse", "trino", "athena", "bigquery"]))
@click.option("--table-prefix", default="gateway_", show_default=True, help="Tables are <prefix><event type>.")
@click.option("--since", default="2026-01-01", show_default=True, help="Athena: first day of the date projection.")
def lake_ddl(config_path: str, name: str, engine: str, table_prefix: str, since: str) -> None:
    """Print the external-table definitions of the lake for a query engine (one table per event type)."""
    from collectors.sdk import ConfigError
    from gateway_tap.ops.lake import run_ddl

    try:
        click.echo(run_ddl(_load(config_path), name, engine, table_prefix, since), nl=False)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@main.group("dlq")
def dlq() -> None:
    """Dead letters: list them with their reasons, show one, send chosen ones back after a fix."""


_config_option = click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
                              help="gateway-tap.yaml")


@dlq.command("list")
@_config_option
@click.option("--topic", help="Only this DLQ topic (default: every <prefix>.*.dlq).")
@click.option("--last", default=10, show_default=True, type=click.IntRange(0), help="Newest entries shown per topic.")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
def dlq_list(config_path: str, topic: str | None, last: int, as_json: bool) -> None:
    """Per DLQ topic: the record count and the newest entries (original position, collector, error)."""
    from rich.console import Console

    from gateway_tap.ops.dlq import run_list

    raise SystemExit(run_list(_load(config_path), topic, last, as_json, Console()))


@dlq.command("show")
@_config_option
@click.argument("topic")
@click.argument("entry", metavar="[PARTITION:]OFFSET")
@click.option("--max-bytes", default=65536, show_default=True, type=click.IntRange(1), help="Value bytes shown.")
def dlq_show(config_path: str, topic: str, entry: str, max_bytes: int) -> None:
    """One dead letter: its headers (with the reason) and its value, pretty-printed when JSON."""
    from rich.console import Console

    from gateway_tap.ops.dlq import run_show

    raise SystemExit(run_show(_load(config_path), topic, entry, max_bytes, Console()))


@dlq.command("replay")
@_config_option
@click.argument("topic")
@click.option("--offsets", help="Entries to send: 1,2,5 or PARTITION:OFFSET,...")
@click.option("--all", "everything", is_flag=True, help="Send every entry of TOPIC.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dlq_replay(config_path: str, topic: str, offsets: str | None, everything: bool, yes: bool) -> None:
    """Send chosen dead letters back to their original topic (key, value, original headers)."""
    from rich.console import Console

    from gateway_tap.ops.dlq import run_replay

    if bool(offsets) == everything:
        raise click.UsageError("give exactly one of --offsets and --all")
    raise SystemExit(run_replay(_load(config_path), topic, offsets, everything, yes, Console()))


def _admin_commands() -> click.Group:
    from gateway_tap.admin.commands import admin

    return admin


main.add_command(_admin_commands())
