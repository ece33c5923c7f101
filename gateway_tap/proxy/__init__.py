"""The tap's HTTP side: routing, upstream forwarding, accounting, errors, metrics and the server.

Entry points: :func:`gateway_tap.proxy.app.create_app` and :func:`gateway_tap.proxy.server.serve`.
"""
