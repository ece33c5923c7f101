"""``gateway-tap up``: the embedded local stack in the foreground.

Starts each component as a child process through :mod:`gateway_tap.devstack`
(the same code the tests and benchmarks use), and stops them in reverse order
on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import click

from gateway_tap.devstack import ManagedProcess, NoidaServer, mock_llm_process


@dataclass
class LocalStack:
    """The components of the local stack, started in order and stopped in reverse.

    :param state_dir: where data and logs live (``.gateway-tap/`` by default).
    :param kafka_port: broker port; ``es_port``: Elasticsearch port; ``mock_port``: mock LLM port.
    """

    state_dir: Path
    kafka_port: int = 9092
    es_port: int = 9200
    mock_port: int = 8090
    started: list[tuple[str, NoidaServer | ManagedProcess]] = field(default_factory=list)

    def start(self) -> None:
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        noida = NoidaServer(data_dir=self.state_dir / "noida", kafka_port=self.kafka_port,
                            es_port=self.es_port, log_path=logs / "noida.log")
        self._start("broker + elasticsearch (noida-db)", noida)
        self._start("mock LLM", mock_llm_process(self.mock_port, log_path=logs / "mock-llm.log"))

    def _start(self, label: str, component: NoidaServer | ManagedProcess) -> None:
        click.echo(f"starting {label} ...")
        component.start()
        self.started.append((label, component))

    def stop(self) -> None:
        while self.started:
            label, component = self.started.pop()
            click.echo(f"stopping {label} ...")
            component.stop()

    def endpoints(self) -> dict[str, str]:
        return {
            "kafka": f"127.0.0.1:{self.kafka_port}",
            "elasticsearch": f"http://127.0.0.1:{self.es_port}",
            "mock LLM": f"http://127.0.0.1:{self.mock_port}/v1",
        }


def run_stack(stack: LocalStack) -> None:
    """Start ``stack``, print its endpoints and block until Ctrl-C/SIGTERM, then stop it."""
    stopping = threading.Event()
    # Installed explicitly: a shell starting us in the background may have set SIGINT to "ignore".
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    try:
        stack.start()
        for name, url in stack.endpoints().items():
            click.echo(f"  {name:<14} {url}")
        click.echo("ready; press Ctrl-C to stop")
        while not stopping.wait(0.5):
            pass
    finally:
        stack.stop()
        click.echo("stopped")
