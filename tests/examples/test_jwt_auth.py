"""The JWT auth example through the real tap with the openai SDK: HS256 (secret from the environment) and RS256 (a
JWKS file), claims mapped to app_id / user_id and visible to later hooks as ctx.claims; expired tokens, wrong audience,
wrong key and a missing bearer are refused with specific codes; plugin endpoints authenticate the same way."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway_tap.hooks import HookContext, HookResult, TapRequest
from gateway_tap.plugins.testing import PluginHarness
from gateway_tap.settings import AppConfig
from schemas import Analytics
from tests.support.tap import UPSTREAM_SECRET, by_request, read_events, running_tap, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
SECRET = "hs256-test-secret-0123456789abcdef0123"
os.environ["TAP_TEST_JWT_SECRET"] = SECRET
ISSUER, AUDIENCE = "https://idp.test", "gateway-tap"
MESSAGES: Any = [{"role": "user", "content": "hello"}]


class ClaimsToTags:
    """A later hook reading ctx.claims: the token's team becomes a tag in the events."""

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        team = ctx.claims.get("team")
        if team is not None:
            ctx.metadata["team"] = str(team)
            ctx.metadata["first_role"] = str(ctx.claims["realm"]["roles"][0])
        return None


def token(key: Any = SECRET, alg: str = "HS256", kid: str | None = None, expires_in_s: float = 300,
          **claims: Any) -> str:
    payload = {"iss": ISSUER, "aud": AUDIENCE, "azp": "test", "sub": "alice", "exp": int(time.time() + expires_in_s),
               "team": "search", "realm": {"roles": ["reader", "writer"]}, **claims}
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid else None)


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """The issuer's key (published in a JWKS file) and an attacker's key with the same kid."""
    issuer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(issuer_key.public_key()))
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    return issuer_key, other_key, path


def _plugins(jwks: Path) -> list[dict[str, Any]]:
    return [{"name": "jwt", "use": "gateway_tap.examples.plugins.jwt_auth:JwtAuth",
             "config": {"hs256_secret_env": "TAP_TEST_JWT_SECRET", "jwks_file": str(jwks), "issuer": ISSUER,
                        "audience": AUDIENCE, "leeway_s": 30, "app_id_claim": "azp", "user_id_claim": "sub"}},
            {"name": "claims_to_tags", "use": "tests.examples.test_jwt_auth:ClaimsToTags", "order": 5},
            {"name": "feed", "use": "gateway_tap.examples.plugins.budget_feed:BudgetFeed"}]


async def test_tokens_through_the_tap_with_the_openai_sdk(mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                                          tmp_path: Path, rsa_keys: tuple[Any, Any, Path]) -> None:
    issuer_key, other_key, jwks = rsa_keys
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=_plugins(jwks))

    async def call(bearer: str) -> Any:
        client = openai.AsyncOpenAI(base_url=f"{tap.url}/llm/openai/v1", api_key=bearer, max_retries=0)
        return await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                       max_tokens=2)

    async def refused(bearer: str, error: type[openai.APIStatusError] = openai.AuthenticationError) -> str:
        with pytest.raises(error) as raised:
            await call(bearer)
        body = raised.value.body
        assert isinstance(body, dict) and SECRET not in str(body) and bearer not in str(body)
        return str(body["code"])

    async with running_tap(document) as tap:
        hs = await call(token(sub="alice"))
        rs = await call(token(issuer_key, "RS256", kid="k1", sub="bob"))
        skewed = await call(token(expires_in_s=-10))  # expired 10 s ago, within the 30 s leeway
        assert (hs.status_code, rs.status_code, skewed.status_code) == (200, 200, 200)
        assert await refused(token(expires_in_s=-120)) == "token_expired"
        assert await refused(token(aud="someone-else")) == "invalid_audience"
        assert await refused(token(iss="https://evil.test")) == "invalid_issuer"
        assert await refused(token("another-secret-of-the-same-length-xyz")) == "invalid_signature"
        assert await refused(token(other_key, "RS256", kid="k1")) == "invalid_signature"  # right kid, wrong key
        assert await refused(token(other_key, "RS256", kid="nope")) == "invalid_signature"
        assert await refused(token(azp=None)) == "missing_app_claim"
        assert await refused("gt-test-key-0123456789") == "invalid_token"  # an app key is not a JWT here
        assert await refused(token(azp="ghost"), openai.PermissionDeniedError) == "unknown_app"
        assert await refused(jwt.encode({"azp": "test", "aud": AUDIENCE, "iss": ISSUER}, SECRET)) == "invalid_token"
        async with aiohttp.ClientSession() as http:
            url = f"{tap.url}/llm/openai/v1/chat/completions"
            async with http.post(url, json={"model": "gpt-4o-mini", "messages": MESSAGES}) as resp:
                assert resp.status == 401 and resp.headers["www-authenticate"] == "Bearer"
                assert (await resp.json())["error"]["code"] == "missing_bearer_token"
            # Plugin endpoints authenticate with the same gateway-wide auth plugin.
            feed = f"{tap.url}/plugins/feed/events?events=1"
            async with http.get(feed, headers={"authorization": f"Bearer {token(sub='carol')}"}) as resp:
                assert resp.status == 200 and b'"app_id":"test"' in await resp.read()
            async with http.get(feed, headers={"authorization": f"Bearer {token(expires_in_s=-120)}"}) as resp:
                assert resp.status == 401 and (await resp.json())["error"]["code"] == "token_expired"

    ids = {"alice": hs.headers["x-request-id"], "bob": rs.headers["x-request-id"]}
    events = by_request(await read_events(kafka_bootstrap, topic_prefix, count=3 + 3))
    for user, request_id in ids.items():
        analytics = events[request_id]["analytics"]
        assert isinstance(analytics, Analytics)
        assert (analytics.app_id, analytics.user_id) == ("test", user)
        assert analytics.tags == {"team": "search", "first_role": "reader"}  # claims seen by a later hook


async def test_claims_are_read_only_and_config_is_checked() -> None:
    config = {"hs256_secret_env": "TAP_TEST_JWT_SECRET", "audience": AUDIENCE, "app_id_claim": "realm.app"}
    async with PluginHarness("gateway_tap.examples.plugins.jwt_auth:JwtAuth", config, name="jwt",
                             apps=[AppConfig(id="nested")]) as h:
        sent = await h.request(json={"model": "m", "messages": []},
                               headers={"authorization": f"Bearer {token(realm={'app': 'nested', 'roles': ['r']})}"})
    assert sent.stopped is None and sent.scope.app_id == "nested"
    claims = sent.scope.claims
    with pytest.raises(TypeError):
        claims["realm"]["app"] = "other"  # type: ignore[index]
    assert claims["realm"]["roles"] == ("r",)
    from gateway_tap.plugins import PluginLoadError

    with pytest.raises(PluginLoadError, match=r"is not valid under any of the given schemas"):
        async with PluginHarness("gateway_tap.examples.plugins.jwt_auth:JwtAuth", {"audience": "x"}):
            pass
