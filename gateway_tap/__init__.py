"""gateway-tap: an LLM gateway tap with inline hooks that publishes events to Kafka."""

__version__ = "0.1.0"
