"""Development tooling, never imported by the runtime packages.

- :mod:`~gateway_tap.dev.servers`: lifecycle of the test-bed servers (noida-db, PostgreSQL, the mock LLM,
  any managed child process), shared by the test fixtures, ``gateway-tap up`` and the benchmarks.
- :mod:`~gateway_tap.dev.stack`: the components of ``gateway-tap up`` (ports, generated config, leftovers
  of a crashed run); :mod:`~gateway_tap.dev.panel` is its live view and :mod:`~gateway_tap.dev.up` runs both.
- :mod:`~gateway_tap.dev.demo_traffic`: ``up --demo-traffic``.
- :mod:`~gateway_tap.dev.mock_llm`: the deterministic OpenAI/Anthropic upstream (``gateway-tap mock-llm``).
"""
