"""The built-in ``lake`` collector: the events as Parquet on a local directory or S3, exactly once.

- :mod:`.config`: its config section (``collectors.<NAME>.config``);
- :mod:`.layout`: the Hive-style directories and the object names (topic, partition, first and last offset);
- :mod:`.store`: the destinations (a local directory; any S3-compatible endpoint);
- :mod:`.collector`: the collector (rolls per partition, recovery after a crash or a replay);
- :mod:`.compact`: ``gateway-tap lake compact``; :mod:`.ddl`: ``gateway-tap lake ddl``.
"""
