"""The admin API: apps, keys, budgets and plugin configs managed live, shared by every tap replica.

:mod:`.db` (one SQL dialect over the budget store's SQLite / PostgreSQL database), :mod:`.state`
(the state and how it overlays the YAML file), :mod:`.store` (reads and transactional changes),
:mod:`.sync` (each worker polls the version row), :mod:`.models` and :mod:`.openapi` (bodies and
the generated OpenAPI 3.1 document), :mod:`.api` (the aiohttp application), :mod:`.client` (what
``gateway-tap admin`` calls). The tap wires it into each worker in :mod:`gateway_tap.proxy.admin_link`.
"""
