"""Built-in collectors: ``file`` (JSON Lines), ``elasticsearch`` and ``budget``."""
