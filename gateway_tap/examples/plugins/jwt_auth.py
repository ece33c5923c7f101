"""Authenticates callers by a JWT bearer token instead of an app key (an :class:`~gateway_tap.hooks.AuthHook`).

Needs the ``jwt`` extra: ``pip install 'gateway-tap[jwt]'`` (PyJWT, and cryptography for RS256).

config::

    hs256_secret_env: JWT_SECRET   # HS256: the environment variable holding the shared secret
    jwks_file: /etc/gateway-tap/jwks.json   # RS256: the issuer's public keys (a JWKS document)
    issuer: https://idp.example.com         # required "iss"
    audience: gateway-tap                   # required "aud"
    leeway_s: 30                   # clock skew tolerated on exp / nbf / iat
    app_id_claim: azp              # the claim naming the app (a configured app id); dotted for nested claims
    user_id_claim: sub             # the claim naming the user (optional in the token)
    require_known_app: true        # the app must be one of the configured apps (else 403 unknown_app)
    allow_api_keys: false          # true: requests without a JWT fall back to the app key check

At least one of ``hs256_secret_env`` and ``jwks_file``. A token's ``alg`` must be one the
config enables (HS256 with the secret, RS256 with a JWKS key, found by ``kid``), so a token
can never pick its own verification. ``exp`` is required. The identity's ``claims`` are the
verified token's claims: later hooks read them as ``ctx.claims`` (read-only).

Refusals are 401 with a specific ``code``: ``missing_bearer_token``, ``invalid_token``,
``token_expired``, ``invalid_audience``, ``invalid_issuer``, ``invalid_signature``,
``missing_app_claim``; 403 ``unknown_app``. Never the token itself in a message or a log.
Attached to every LLM (``llms: ["*"]``), it also authenticates calls of plugin endpoints.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway_tap.hooks import GatewayServices, HookContext, HookResult, Identity, PluginServices, TapRequest

try:
    import jwt
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("the JWT auth plugin needs PyJWT: pip install 'gateway-tap[jwt]'") from exc


@dataclass(frozen=True, slots=True)
class Settings:
    secret: str | None
    keys: Mapping[str | None, Any]
    """RS256 verification keys by ``kid`` (``None``: the only key of a JWKS without ids)."""
    issuer: str | None
    audience: str | None
    leeway_s: float
    app_claim: tuple[str, ...]
    user_claim: tuple[str, ...]
    require_known_app: bool
    allow_api_keys: bool


def _read_jwks(path: str) -> dict[str | None, Any]:
    document = orjson.loads(Path(path).read_bytes())
    keys = {key.key_id: key for key in jwt.PyJWKSet.from_dict(document).keys}
    if len(keys) == 1 and None not in keys:
        keys[None] = next(iter(keys.values()))  # a token without kid may use the only key
    return keys


def _claim(claims: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = claims
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _refuse(message: str, code: str, status: int = 401) -> HookResult:
    return HookResult.stop(status, message, code=code, headers={"WWW-Authenticate": "Bearer"} if status == 401
                           else None)


class JwtAuth:
    def config_schema(self) -> Mapping[str, Any]:
        return {"type": "object", "additionalProperties": False,
                "anyOf": [{"required": ["hs256_secret_env"]}, {"required": ["jwks_file"]}],
                "properties": {
                    "hs256_secret_env": {"type": "string", "minLength": 1,
                                         "description": "Environment variable holding the HS256 secret."},
                    "jwks_file": {"type": "string", "minLength": 1, "description": "JWKS file of RS256 keys."},
                    "issuer": {"type": "string"}, "audience": {"type": "string"},
                    "leeway_s": {"type": "number", "minimum": 0},
                    "app_id_claim": {"type": "string", "minLength": 1},
                    "user_id_claim": {"type": "string", "minLength": 1},
                    "require_known_app": {"type": "boolean"}, "allow_api_keys": {"type": "boolean"}}}

    async def initialize(self, config: Mapping[str, Any], services: PluginServices) -> None:
        self.gateway: GatewayServices = services.gateway
        await self.on_config_change(config)

    async def on_config_change(self, config: Mapping[str, Any]) -> None:
        secret = None
        if "hs256_secret_env" in config:
            secret = os.environ.get(config["hs256_secret_env"])
            if not secret:
                raise ValueError(f"environment variable {config['hs256_secret_env']} (hs256_secret_env) is not set")
        keys = await asyncio.to_thread(_read_jwks, config["jwks_file"]) if "jwks_file" in config else {}
        # One assignment: a request verifies with the old or the new settings, never half of each.
        self.settings = Settings(
            secret, keys, config.get("issuer"), config.get("audience"), float(config.get("leeway_s", 30)),
            tuple(str(config.get("app_id_claim", "azp")).split(".")),
            tuple(str(config.get("user_id_claim", "sub")).split(".")),
            bool(config.get("require_known_app", True)), bool(config.get("allow_api_keys", False)))

    async def authenticate(self, request: TapRequest, ctx: HookContext) -> Identity | HookResult | None:
        s = self.settings
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None if s.allow_api_keys else _refuse(
                "a bearer token is required: send 'Authorization: Bearer <JWT>'", "missing_bearer_token")
        if token.count(".") != 2:
            return None if s.allow_api_keys else _refuse("the bearer token is not a JWT", "invalid_token")
        try:
            claims = self._verify(token, s)
        except jwt.ExpiredSignatureError:
            return _refuse("the token has expired", "token_expired")
        except jwt.InvalidAudienceError:
            return _refuse("the token is not meant for this gateway (audience)", "invalid_audience")
        except jwt.InvalidIssuerError:
            return _refuse("the token's issuer is not accepted", "invalid_issuer")
        except jwt.InvalidSignatureError:
            return _refuse("the token's signature does not verify", "invalid_signature")
        except jwt.PyJWTError as exc:
            return _refuse(f"the token is not valid: {exc}", "invalid_token")
        app_id = _claim(claims, s.app_claim)
        if not isinstance(app_id, str) or not app_id:
            return _refuse(f"the token has no {'.'.join(s.app_claim)!r} claim naming the app", "missing_app_claim")
        if s.require_known_app and self.gateway.get_app(app_id) is None:
            return _refuse(f"app {app_id!r} is not known to this gateway", "unknown_app", 403)
        user = _claim(claims, s.user_claim)
        return Identity(app_id, None if user is None else str(user), claims)

    @staticmethod
    def _verify(token: str, s: Settings) -> dict[str, Any]:
        header = jwt.get_unverified_header(token)
        alg = header.get("alg")
        key: Any
        if alg == "HS256" and s.secret is not None:
            key = s.secret
        elif alg == "RS256" and s.keys:
            found = s.keys.get(header.get("kid"))
            if found is None:
                raise jwt.InvalidSignatureError("no key with this kid")
            key = found
        else:
            raise jwt.InvalidAlgorithmError(f"algorithm {alg!r} is not accepted here")
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=[alg], audience=s.audience, issuer=s.issuer, leeway=s.leeway_s,
            options={"require": ["exp"], "verify_aud": s.audience is not None, "verify_iss": s.issuer is not None})
        return claims
