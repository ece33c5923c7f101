"""A collector's own config (``collectors.<NAME>.config``): validated before ``initialize``.

A collector declares it once, as a pydantic model (:attr:`DataCollector.Config`, what the
built-in sinks do) or as a JSON Schema (:attr:`DataCollector.config_schema`). Either way
every problem is reported at once, each naming ``collectors.<NAME>.config.<path>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from collectors.sdk import ConfigError, DataCollector
from gateway_tap.settings.base import format_validation_error
from gateway_tap.settings.extension import check_extension_config

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
    """``config`` validated for ``collector_cls``, with defaults filled in
    (:func:`gateway_tap.settings.extension.check_extension_config`, the check tap plugins get too).

    With a ``Config`` model: every field, nested ones included, is in the result. With only a
    JSON Schema: the ``default`` of every property missing, at any depth of the objects present.

    :raises ConfigError: one line per problem, each naming ``collectors.<name>.config.<path>``.
    """
    filled, problems = check_extension_config(collector_cls, config, f"collectors.{name}.config")
    if problems:
        raise ConfigError("\n".join(problems))
    return filled
