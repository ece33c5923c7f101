"""Examples shipped with the package, so they work from an installed wheel as well as from the repo.

- ``gateway-tap.yaml``: the demo configuration ``gateway-tap up`` runs when no ``--config`` is given
  (:data:`DEMO_CONFIG`).
- :mod:`~gateway_tap.examples.plugins`: tap plugins (``use: gateway_tap.examples.plugins.<module>:<Class>``).
- :mod:`~gateway_tap.examples.collectors`: collectors (``plugin: gateway_tap.examples.collectors.<module>:<Class>``).

Each is also a template for writing your own.
"""

from __future__ import annotations

from pathlib import Path

DEMO_CONFIG = Path(__file__).with_name("gateway-tap.yaml")
