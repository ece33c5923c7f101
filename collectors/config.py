"""A collector's own config (``collectors.<NAME>.config``): validated before ``initialize``.

A collector declares it once, as a pydantic model (:attr:`DataCollector.Config`, what the
built-in sinks do) or as a JSON Schema (:attr:`DataCollector.config_schema`). Either way
every problem is reported at once, each naming ``collectors.<NAME>.config.<path>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import jsonschema
from pydantic import BaseModel, ValidationError

from collectors.sdk import ConfigError, DataCollector
from gateway_tap.settings.base import format_validation_error

ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_collector_config(name: str, model: type[ModelT], config: Mapping[str, Any]) -> ModelT:
    """``config`` as a ``model`` instance (what a collector with a ``Config`` does in ``initialize``).

    :raises ConfigError: one line per problem, each naming ``collectors.<name>.config.<path>``.
    """
    try:
        return model.model_validate(config)
    except ValidationError as exc:
        raise ConfigError("\n".join(format_validation_error(exc, f"collectors.{name}.config"))) from None


def validate_collector_config(name: str, collector_cls: type[DataCollector],
                              config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` validated for ``collector_cls``, with defaults filled in.

    With a ``Config`` model: every field, nested ones included, is in the result. With only a
    JSON Schema: top-level ``default`` values are filled in.

    :raises ConfigError: one line per problem, each naming ``collectors.<name>.config.<path>``.
    """
    if collector_cls.Config is not None:
        return parse_collector_config(name, collector_cls.Config, config).model_dump()
    return _validate_schema(name, collector_cls.config_schema, config)


def _validate_schema(name: str, schema: dict[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path)):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        problems.append(f"collectors.{name}.config{path}: {err.message}")
    if problems:
        raise ConfigError("\n".join(problems))
    filled = dict(config)
    for key, prop in schema.get("properties", {}).items():
        if key not in filled and isinstance(prop, dict) and "default" in prop:
            filled[key] = prop["default"]
    return filled
