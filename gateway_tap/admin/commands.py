"""``gateway-tap admin ...``: the admin API from the command line (``--json`` prints the API's answers).

What a caller stored (names, metadata, error messages quoting them) is printed with its control and
non-printing characters escaped (``\\x1b``), so a value can never drive the terminal.
"""

from __future__ import annotations

import json
import unicodedata
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import click

from gateway_tap.admin.client import AdminClient, AdminClientError
from gateway_tap.settings.base import control_characters

_json_option = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer.")


@click.group("admin")
@click.option("--url", envvar="GATEWAY_TAP_ADMIN_URL", default="http://127.0.0.1:8081", show_default=True,
              help="The admin API (env GATEWAY_TAP_ADMIN_URL).")
@click.option("--token-env", default="GATEWAY_TAP_ADMIN_TOKEN", show_default=True,
              help="Environment variable holding the admin token (never a command-line value: shell history).")
@click.pass_context
def admin(ctx: click.Context, url: str, token_env: str) -> None:
    """Manage apps, keys, budgets and plugin configs through a tap's admin API."""
    import os

    token = os.environ.get(token_env, "")
    ctx.obj = (url, token, token_env)


def safe(value: Any) -> str:
    """``str(value)`` with control and non-printing format characters escaped (``\\x1b``, ``\\u202e``)."""
    text = str(value)
    if not control_characters(text):
        return text
    return "".join(ascii(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in text)


def _say(text: Any, err: bool = False) -> None:
    click.echo(safe(text), err=err)


def _seg(value: str) -> str:
    """``value`` as one URL path segment (an id with a ``/`` or ``..`` never names another resource)."""
    return urllib.parse.quote(value, safe="")


def _client() -> AdminClient:
    url, token, token_env = click.get_current_context().obj
    if not token:
        raise click.ClickException(f"${token_env} is empty: export the admin token first")
    return AdminClient(url, token)


def _call(method: str, path: str, body: Any = None, params: dict[str, str | None] | None = None) -> Any:
    try:
        return _client().call(method, path, body, params)
    except AdminClientError as exc:
        raise click.ClickException(safe(exc)) from None


def _show(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2) if data is not None else "")  # JSON escapes control characters
    else:
        human(data)


def _rows(rows: Sequence[Sequence[Any]]) -> None:
    """Aligned columns, the first row a header."""
    cells = [[safe(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _meta(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--meta")
        out[key] = value
    return out


# -- apps --------------------------------------------------------------------------------------------------------


@admin.group("apps")
def apps() -> None:
    """Apps: create, list, get, update, delete."""


def _app_line(app: dict[str, Any]) -> None:
    _rows([("id", "name", "llms", "enabled", "source", "metadata"),
           (app["id"], app["name"] or "-", ",".join(app["allowed_llms"]), app["enabled"], app["source"],
            json.dumps(app["metadata"]) if app["metadata"] else "-")])


@apps.command("create")
@click.argument("app_id")
@click.option("--name", default="", help="Display name.")
@click.option("--llm", "llms", multiple=True, help="An allowed LLM id (repeatable; default: all).")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="A metadata label (repeatable).")
@click.option("--disabled", is_flag=True, help="Create it disabled (its keys refused until enabled).")
@_json_option
def apps_create(app_id: str, name: str, llms: tuple[str, ...], meta: tuple[str, ...], disabled: bool,
                as_json: bool) -> None:
    """Create an app."""
    body = {"id": app_id, "name": name, "allowed_llms": list(llms) or ["*"], "metadata": _meta(meta),
            "enabled": not disabled}
    _show(_call("POST", "/v1/apps", body), as_json, _app_line)


@apps.command("list")
@_json_option
def apps_list(as_json: bool) -> None:
    """Every app (from the file and from the API)."""
    data = _call("GET", "/v1/apps")
    _show(data, as_json, lambda d: _rows([("id", "name", "llms", "enabled", "source")] + [
        (a["id"], a["name"] or "-", ",".join(a["allowed_llms"]), a["enabled"], a["source"]) for a in d["data"]]))


@apps.command("get")
@click.argument("app_id")
@_json_option
def apps_get(app_id: str, as_json: bool) -> None:
    """One app."""
    _show(_call("GET", f"/v1/apps/{_seg(app_id)}"), as_json, _app_line)


@apps.command("update")
@click.argument("app_id")
@click.option("--name", help="New display name.")
@click.option("--llm", "llms", multiple=True, help="Replace the allowed LLMs (repeatable).")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Replace the metadata (repeatable).")
@click.option("--enable/--disable", "enabled", default=None, help="Accept or refuse the app's keys.")
@_json_option
def apps_update(app_id: str, name: str | None, llms: tuple[str, ...], meta: tuple[str, ...], enabled: bool | None,
                as_json: bool) -> None:
    """Change an app's name, allowed LLMs, metadata or enabled flag."""
    body: dict[str, Any] = {}
    if name is not None:
        body["name"] = name
    if llms:
        body["allowed_llms"] = list(llms)
    if meta:
        body["metadata"] = _meta(meta)
    if enabled is not None:
        body["enabled"] = enabled
    _show(_call("PATCH", f"/v1/apps/{_seg(app_id)}", body), as_json, _app_line)


@apps.command("delete")
@click.argument("app_id")
def apps_delete(app_id: str) -> None:
    """Delete an app with its keys and budgets."""
    _call("DELETE", f"/v1/apps/{_seg(app_id)}")
    _say(f"deleted app {_seg(app_id)}")


# -- keys --------------------------------------------------------------------------------------------------------


@admin.group("keys")
def keys() -> None:
    """An app's keys: issue, list, revoke, rotate."""


def _issued(key: dict[str, Any]) -> None:
    _say(f"key:    {key['key']}")
    _say(f"id:     {key['id']}  (prefix {key['prefix']}, app {key['app_id']})")
    _say("This is the only time the key is shown: store it now.", err=True)


def _limit_options(fn: Callable[..., None]) -> Callable[..., None]:
    for option in reversed((
            click.option("--rpm", "requests_per_minute", type=int, help="Requests per minute."),
            click.option("--tpm", "tokens_per_minute", type=int, help="Tokens per minute."),
            click.option("--concurrent", "max_concurrent", type=int, help="Requests in flight."))):
        fn = option(fn)
    return fn


def _limits(requests_per_minute: int | None, tokens_per_minute: int | None,
            max_concurrent: int | None) -> dict[str, int]:
    return {k: v for k, v in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute),
                              ("max_concurrent", max_concurrent)) if v is not None}


@keys.command("issue")
@click.argument("app_id")
@click.option("--name", default="", help="Names the key to people.")
@click.option("--expires-in-s", type=click.FloatRange(0, min_open=True), help="Valid for this many seconds.")
@_limit_options
@_json_option
def keys_issue(app_id: str, name: str, expires_in_s: float | None, requests_per_minute: int | None,
               tokens_per_minute: int | None, max_concurrent: int | None, as_json: bool) -> None:
    """Issue a key (shown once), optionally named, expiring and with its own rate limits."""
    body: dict[str, Any] = {"name": name}
    if expires_in_s is not None:
        body["expires_in_s"] = expires_in_s
    limits = _limits(requests_per_minute, tokens_per_minute, max_concurrent)
    if limits:
        body["rate_limits"] = limits
    _show(_call("POST", f"/v1/apps/{_seg(app_id)}/keys", body), as_json, _issued)


@keys.command("list")
@click.argument("app_id")
@_json_option
def keys_list(app_id: str, as_json: bool) -> None:
    """The app's keys (prefixes, states, times)."""
    data = _call("GET", f"/v1/apps/{_seg(app_id)}/keys")
    _show(data, as_json, lambda d: _rows([("id", "prefix", "state", "created", "expires", "last used")] + [
        (k["id"], k["prefix"], k["state"], k["created_at"], k["expires_at"] or "-", k["last_used_at"] or "-")
        for k in d["data"]]))


@keys.command("revoke")
@click.argument("app_id")
@click.argument("key_id")
@_json_option
def keys_revoke(app_id: str, key_id: str, as_json: bool) -> None:
    """Revoke a key at once."""
    _show(_call("DELETE", f"/v1/apps/{_seg(app_id)}/keys/{_seg(key_id)}"), as_json,
          lambda k: _say(f"revoked {k['id']} ({k['prefix']})"))


@keys.command("rotate")
@click.argument("app_id")
@click.argument("key_id")
@click.option("--overlap-s", default=3600.0, show_default=True, type=click.FloatRange(0),
              help="How long the old key stays valid next to the new one.")
@_json_option
def keys_rotate(app_id: str, key_id: str, overlap_s: float, as_json: bool) -> None:
    """Issue a successor; the old key expires after the overlap."""
    data = _call("POST", f"/v1/apps/{_seg(app_id)}/keys/{_seg(key_id)}/rotate", {"overlap_s": overlap_s})

    def human(d: dict[str, Any]) -> None:
        _issued(d["issued"])
        _say(f"old key {d['previous']['id']} valid until {d['previous']['expires_at']}")

    _show(data, as_json, human)


# -- rate limits -------------------------------------------------------------------------------------------------


@admin.group("rate-limits")
def rate_limits() -> None:
    """An app's rate limits: set, list, delete (a key's own: keys issue --rpm/--tpm/--concurrent)."""


@rate_limits.command("set")
@click.argument("app_id")
@click.option("--llm", "llm_id", help="Only the app's requests to this LLM.")
@click.option("--model", help="With --llm: only the requests for this model.")
@_limit_options
@_json_option
def rate_limits_set(app_id: str, llm_id: str | None, model: str | None, requests_per_minute: int | None,
                    tokens_per_minute: int | None, max_concurrent: int | None, as_json: bool) -> None:
    """Create or replace the app's rate limits for (LLM, model)."""
    body = {"llm_id": llm_id, "model": model, **_limits(requests_per_minute, tokens_per_minute, max_concurrent)}
    _show(_call("PUT", f"/v1/apps/{_seg(app_id)}/rate-limits", body), as_json,
          lambda r: _say(f"rate limits set: {r['settings']}"))


@rate_limits.command("list")
@click.argument("app_id")
@_json_option
def rate_limits_list(app_id: str, as_json: bool) -> None:
    """The app's rate limits, the file's and the API's."""
    data = _call("GET", f"/v1/apps/{_seg(app_id)}/rate-limits")

    def cell(value: Any) -> Any:
        return "-" if value is None else value

    _show(data, as_json, lambda d: _rows([("llm", "model", "requests/min", "tokens/min", "in flight", "source")] + [
        (r["settings"]["llm_id"] or "*", r["settings"]["model"] or "*", cell(r["settings"]["requests_per_minute"]),
         cell(r["settings"]["tokens_per_minute"]), cell(r["settings"]["max_concurrent"]), r["source"])
        for r in d["data"]]))


@rate_limits.command("delete")
@click.argument("app_id")
@click.option("--llm", "llm_id", help="The LLM of app x LLM limits.")
@click.option("--model", help="The model of app x LLM x model limits.")
def rate_limits_delete(app_id: str, llm_id: str | None, model: str | None) -> None:
    """Delete one of the app's rate limits."""
    _call("DELETE", f"/v1/apps/{_seg(app_id)}/rate-limits", params={"llm_id": llm_id, "model": model})
    _say("deleted")


# -- budgets -----------------------------------------------------------------------------------------------------


@admin.group("budgets")
def budgets() -> None:
    """An app's budgets, or one key's (--key): set, get, delete."""


_key_option = click.option("--key", "key_id", help="A key of the app (its id): the key's own budget. A rotation's "
                                                   "successor keeps it.")


def _budgets_path(app_id: str, key_id: str | None) -> str:
    return f"/v1/apps/{_seg(app_id)}" + (f"/keys/{_seg(key_id)}" if key_id else "") + "/budgets"


@budgets.command("set")
@click.argument("app_id")
@_key_option
@click.option("--llm", "llm_id", help="Only this LLM of the app (default: all its LLMs).")
@click.option("--usd", "limit_usd", type=float, help="Spend limit per period in USD.")
@click.option("--tokens", "limit_tokens", type=int, help="Total-token limit per period.")
@click.option("--period", type=click.Choice(["monthly", "daily"]), default="monthly", show_default=True)
@click.option("--mode", type=click.Choice(["hard", "soft"]), default="hard", show_default=True)
@_json_option
def budgets_set(app_id: str, key_id: str | None, llm_id: str | None, limit_usd: float | None,
                limit_tokens: int | None, period: str, mode: str, as_json: bool) -> None:
    """Create or replace the app's (or its key's) budget for (LLM, period)."""
    body = {"llm_id": llm_id, "limit_usd": limit_usd, "limit_tokens": limit_tokens, "period": period, "mode": mode}
    _show(_call("PUT", _budgets_path(app_id, key_id), body), as_json,
          lambda b: _say(f"budget set: {b['settings']}"))


@budgets.command("get")
@click.argument("app_id")
@_key_option
@_json_option
def budgets_get(app_id: str, key_id: str | None, as_json: bool) -> None:
    """The app's budgets and its current spend (--key: the key's own, and the spend of every budget it is under)."""
    data = _call("GET", _budgets_path(app_id, key_id))

    def human(d: dict[str, Any]) -> None:
        rows: list[tuple[Any, ...]] = [("key", "llm", "period", "mode", "limit usd", "limit tokens", "source")]
        rows += [(b["settings"].get("key_id") or "*", b["settings"]["llm_id"] or "*", b["settings"]["period"],
                  b["settings"]["mode"],
                  b["settings"]["limit_usd"] if b["settings"]["limit_usd"] is not None else "-",
                  b["settings"]["limit_tokens"] if b["settings"]["limit_tokens"] is not None else "-", b["source"])
                 for b in d["data"]]
        _rows(rows)
        for s in (d.get("spend") or {}).get("budgets", []):
            who = f"key {s['key_id']} " if s.get("key_id") else ""
            _say(f"spend {who}{s.get('llm_id') or '*'} {s.get('period')}: ${s.get('spent_usd', 0):.6f}, "
                 f"{s.get('spent_tokens', 0)} tokens, {s.get('percent_used', 0)}% used, resets {s.get('resets_at')}")

    _show(data, as_json, human)


@budgets.command("delete")
@click.argument("app_id")
@_key_option
@click.option("--llm", "llm_id", help="The LLM of an app x LLM budget.")
@click.option("--period", type=click.Choice(["monthly", "daily"]), default="monthly", show_default=True)
def budgets_delete(app_id: str, key_id: str | None, llm_id: str | None, period: str) -> None:
    """Delete one of the app's (or its key's) budgets."""
    _call("DELETE", _budgets_path(app_id, key_id), params={"period": period, "llm_id": llm_id})
    _say(f"deleted the {period} budget of {_seg(app_id)}{' key ' + _seg(key_id) if key_id else ''}"
         f"{' x ' + llm_id if llm_id else ''}")


# -- plugins, LLMs, status ---------------------------------------------------------------------------------------


@admin.group("plugins")
def plugins() -> None:
    """Plugins: list, create (of an allowed class), update (enable, LLMs, order), delete; configs: set, reset."""


def _plugin_rows(items: list[dict[str, Any]]) -> None:
    _rows([("name", "use", "enabled", "llms", "order", "source", "config")] + [
        (p["name"], p["use"], p["enabled"], ",".join(p["llms"]), p["order"],
         p["source"] if p["config_source"] == p["source"] else f"{p['source']} (config: {p['config_source']})",
         json.dumps(p["config"])) for p in items])


def _config_arg(config_json: str | None, path: Any, required: bool) -> dict[str, Any] | None:
    text = path.read() if path is not None else config_json
    if text is None:
        if required:
            raise click.UsageError("give CONFIG or --file")
        return None
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="CONFIG") from None
    if not isinstance(config, dict):
        raise click.BadParameter("a JSON object is needed", param_hint="CONFIG")
    return config


_config_file = click.option("--file", "path", type=click.File(), help="Read the JSON config from this file ('-': "
                            "stdin).")


@plugins.command("get")
@click.argument("name", required=False)
@_json_option
def plugins_get(name: str | None, as_json: bool) -> None:
    """Every plugin (the file's and the API's) with its effective config, or one plugin with its schema."""
    data = _call("GET", f"/v1/plugins/{_seg(name)}" if name else "/v1/plugins")
    _show(data, as_json, lambda d: _plugin_rows([d] if name else d["data"]))


@plugins.command("create")
@click.argument("name")
@click.option("--use", required=True, help="The class: an installed entry point name (group gateway_tap.plugins), "
              "a class the file's plugins use, or one listed in tap.admin.allowed_plugins.")
@click.option("--llm", "llms", multiple=True, help="An LLM id it attaches to (repeatable; default: all).")
@click.option("--order", type=int, default=0, show_default=True, help="Lower runs first.")
@click.option("--timeout-ms", type=click.FloatRange(min=0, min_open=True), help="Per hook call (default 1000).")
@click.option("--on-error", type=click.Choice(["fail_closed", "fail_open"]), help="Default fail_closed.")
@click.option("--disabled", is_flag=True, help="Create it disabled (not loaded until enabled).")
@click.argument("config_json", metavar="[CONFIG]", required=False)
@_config_file
@_json_option
def plugins_create(name: str, use: str, llms: tuple[str, ...], order: int, timeout_ms: float | None,
                   on_error: str | None, disabled: bool, config_json: str | None, path: Any, as_json: bool) -> None:
    """Add plugin NAME (CONFIG: its JSON config), validated as the file's plugins are, by its own checks too."""
    body: dict[str, Any] = {"name": name, "use": use, "llms": list(llms) or ["*"], "order": order,
                            "enabled": not disabled, "config": _config_arg(config_json, path, False) or {}}
    if timeout_ms is not None:
        body["timeout_ms"] = timeout_ms
    if on_error is not None:
        body["on_error"] = on_error
    _show(_call("POST", "/v1/plugins", body), as_json, lambda p: _plugin_rows([p]))


@plugins.command("update")
@click.argument("name")
@click.option("--enable/--disable", "enabled", default=None, help="Load it, or not.")
@click.option("--llm", "llms", multiple=True, help="Replace the LLMs it attaches to (repeatable; '*': all).")
@click.option("--order", type=int, help="Lower runs first.")
@click.option("--timeout-ms", type=click.FloatRange(min=0, min_open=True), help="Per hook call.")
@click.option("--on-error", type=click.Choice(["fail_closed", "fail_open"]))
@_json_option
def plugins_update(name: str, enabled: bool | None, llms: tuple[str, ...], order: int | None,
                   timeout_ms: float | None, on_error: str | None, as_json: bool) -> None:
    """Enable or disable a plugin created through the API, attach it to LLMs, set its order."""
    body = {"enabled": enabled, "llms": list(llms) or None, "order": order, "timeout_ms": timeout_ms,
            "on_error": on_error}
    _show(_call("PATCH", f"/v1/plugins/{_seg(name)}", {k: v for k, v in body.items() if v is not None}), as_json,
          lambda p: _plugin_rows([p]))


@plugins.command("delete")
@click.argument("name")
def plugins_delete(name: str) -> None:
    """Remove a plugin created through the API."""
    _call("DELETE", f"/v1/plugins/{_seg(name)}")
    _say(f"deleted plugin {name}")


@plugins.command("set")
@click.argument("name")
@click.argument("config_json", metavar="CONFIG", required=False)
@_config_file
@_json_option
def plugins_set(name: str, config_json: str | None, path: Any, as_json: bool) -> None:
    """Replace a plugin's whole config (CONFIG: a JSON object), validated as the tap will apply it."""
    config = _config_arg(config_json, path, True)
    _show(_call("PUT", f"/v1/plugins/{_seg(name)}/config", {"config": config}), as_json,
          lambda p: _say(f"{p['name']}: config replaced"))


@plugins.command("reset")
@click.argument("name")
@_json_option
def plugins_reset(name: str, as_json: bool) -> None:
    """A file plugin back to the config in the file."""
    _show(_call("DELETE", f"/v1/plugins/{_seg(name)}/config"), as_json,
          lambda p: _say(f"{p['name']}: back to the file's config"))


@admin.group("llms")
def llms() -> None:
    """The LLMs (read-only)."""


@llms.command("list")
@_json_option
def llms_list(as_json: bool) -> None:
    """Ids, vendors and prices."""
    data = _call("GET", "/v1/llms")
    _show(data, as_json, lambda d: _rows([("id", "vendor", "prices per 1M tokens (in/out)")] + [
        (m["id"], m["vendor"], ", ".join(f"{k}: {v['input_per_1m']}/{v['output_per_1m']} {m['currency']}"
                                         for k, v in m["prices"].items()) or "-") for m in d["data"]]))


@admin.command("status")
@_json_option
def status(as_json: bool) -> None:
    """The state's version, the version each tap worker runs and the entries it could not apply."""
    data = _call("GET", "/v1/status")

    def human(d: dict[str, Any]) -> None:
        _say(f"state version {d['version']}")
        _rows([("gateway", "worker", "pid", "version", "seen", "not applied")]
              + [(t["gateway_id"], t["worker"], t["pid"], t["version"], t["seen_at"], len(t["rejected"]) or "-")
                 for t in d["taps"]])
        for t in d["taps"]:
            for r in t["rejected"]:
                _say(f"{t['gateway_id']} worker {t['worker']} left out {r['entry']}: {r['error']}")

    _show(data, as_json, human)


@admin.command("openapi")
def openapi() -> None:
    """Print the API's OpenAPI 3.1 document."""
    click.echo(json.dumps(_call("GET", "/v1/openapi.json"), indent=2))
