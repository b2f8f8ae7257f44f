"""The run's Prometheus metrics and the gradient noise scale."""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator

from elastune.spec.base import Strict


class MetricsSpec(Strict):
    enabled: bool = Field(True, description="Serve the run's Prometheus metrics (docs/observability.md).")
    host: str = Field(
        "127.0.0.1",
        description=(
            "Address /metrics binds to: 127.0.0.1 keeps it on this machine; 0.0.0.0 lets a Prometheus elsewhere scrape it."
        ),
    )
    port: int = Field(
        0, ge=0, le=65535, description="Port of /metrics; 0 picks a free one (the run prints it and writes a file_sd target)."
    )
    noise_scale: bool | None = Field(
        None,
        description=(
            "Estimate the gradient noise scale from micro-batch gradient norms (one more gradient-sized buffer per worker). "
            "Default: on in the replicated and zero1 layouts, off in fsdp (which does not take micro-batch norms)."
        ),
    )

    @field_validator("host")
    @classmethod
    def _an_address(cls, host: str) -> str:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise ValueError(
                    f"metrics.host ({host!r}) is not an IP address; use 127.0.0.1 (this machine only) or 0.0.0.0 (all interfaces)"
                ) from None
        return host
