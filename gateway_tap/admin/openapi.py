"""The admin API's OpenAPI 3.1 document, generated from its routes and pydantic models (never hand-written)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway_tap import __version__
from gateway_tap.admin.models import Error

_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Route:
    """One operation: what the OpenAPI document says about it."""

    method: str
    path: str
    summary: str
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    query: tuple[tuple[str, str], ...] = ()
    """Query parameters: (name, description); all optional."""


_ERRORS = {"401": "No or an invalid admin token.", "403": "The token may only read.",
           "404": "No such entry.", "409": "Declared in the configuration file (read-only here), or a clash.",
           "413": "The body is over tap.admin.max_body_bytes.", "422": "Invalid body; error.param names the field.",
           "503": "The state database is unavailable."}


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    """OpenAPI 3.1 for ``routes``; schemas from the models in JSON Schema 2020-12 (which 3.1 uses as is)."""
    models: set[type[BaseModel]] = {Error}
    for route in routes:
        models.update(m for m in (route.body, route.response) if m is not None)
    ordered = sorted(models, key=lambda m: m.__name__)
    keys, schemas = models_json_schema([(m, "validation" if _is_request(m, routes) else "serialization")
                                        for m in ordered], ref_template=_REF)
    refs = {model: keys[(model, mode)]["$ref"] for (model, mode) in keys}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op: dict[str, Any] = {"summary": route.summary, "operationId": _operation_id(route),
                              "security": [{"adminToken": []}]}
        params: list[dict[str, Any]] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                                        for name in re.findall(r"{(\w+)}", route.path)]
        params += [{"name": name, "in": "query", "required": False, "description": text,
                    "schema": {"type": "string"}} for name, text in route.query]
        if params:
            op["parameters"] = params
        if route.body is not None:
            op["requestBody"] = {"required": False, "content": {"application/json": {
                "schema": {"$ref": refs[route.body]}}}}
        ok: dict[str, Any] = {"description": "OK"}
        if route.response is not None:
            ok["content"] = {"application/json": {"schema": {"$ref": refs[route.response]}}}
        op["responses"] = {str(route.status): ok, **{
            code: {"description": text, "content": {"application/json": {"schema": {"$ref": refs[Error]}}}}
            for code, text in _ERRORS.items()}}
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "gateway-tap admin API", "version": __version__,
                 "description": "Apps, keys, budgets and plugin configs shared by every tap replica."},
        "paths": paths,
        "components": {"schemas": schemas.get("$defs", {}),
                       "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}}},
    }


def _is_request(model: type[BaseModel], routes: list[Route]) -> bool:
    return any(r.body is model for r in routes)


def _operation_id(route: Route) -> str:
    words = [w for w in re.split(r"[/{}_.]+", route.path) if w and w != "v1"]
    return route.method.lower() + "".join(w[:1].upper() + w[1:] for w in words)
