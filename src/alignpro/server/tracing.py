"""OpenTelemetry traces, off unless ``tracing`` is set: ``otlp`` (the OTLP/HTTP exporter, configured by the standard
``OTEL_EXPORTER_OTLP_*`` variables) or ``console`` (spans printed, for a look on one machine).

A request's trace: the FastAPI server span (``opentelemetry-instrumentation-fastapi``), with ``alignpro.prompter``
and ``alignpro.frozen`` spans inside it, each holding the HTTP calls its engine makes (client spans of the
engines' aiohttp clients, :meth:`alignpro.engines.transport.UpstreamClient.trace`, which also send the
``traceparent`` header, so vLLM's own spans join the trace when vLLM traces too). The packages are the ``[otel]`` extra; with tracing off
nothing of OpenTelemetry is imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from alignpro.errors import ConfigError

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider

    from alignpro.engines.transport import UpstreamClient


class Tracing:
    """The gateway's own spans, or nothing at all when no tracer provider was given."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("alignpro") if provider is not None else None

    @contextlib.contextmanager
    def span(self, name: str, **attributes: str | bool | float) -> Iterator[Any]:
        """A span named ``name`` around the block (the current span inside it); ``None`` when tracing is off."""
        if self.tracer is None:
            yield None
            return
        with self.tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def instrument_app(self, app: FastAPI) -> None:
        if self.provider is None:
            return
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        # Probes and scrapes would be most of the traces and say nothing.
        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=self.provider, excluded_urls="health,metrics,ready"
        )

    def instrument_clients(self, clients: Iterable[UpstreamClient]) -> None:
        if self.provider is None:
            return
        for client in clients:
            client.trace(self.provider)


def from_settings(kind: str) -> Tracing:
    """``off``: no tracing; ``otlp`` or ``console``: a tracer provider exporting there in batches."""
    if kind == "off":
        return Tracing()
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"tracing={kind} needs the [otel] extra (pip install 'alignpro[otel]'): {exc}"
        ) from exc
    exporter: SpanExporter
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_* variables
    else:
        exporter = ConsoleSpanExporter()
    name = os.environ.get("OTEL_SERVICE_NAME", "alignpro-gateway")
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)
