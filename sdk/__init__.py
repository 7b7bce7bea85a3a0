"""The facexplain Python SDK: typed clients of the five gRPC services, and the audit built on them.

It talks to the services over gRPC only (it imports no server and no training code), so it runs on any
machine that can reach them::

    from sdk import EmbeddingClient, image_from_path, wait_ready

    with EmbeddingClient("127.0.0.1:50051") as client:
        wait_ready(client.channel, timeout=30)
        template = client.embed(image_from_path("face.jpg")).template

:class:`Facexplain` opens all five clients on one host; :func:`run_audit` writes the audit report
(``facexplain audit`` on the command line).
"""

from sdk.audit import AuditConfig, AuditError, run_audit
from sdk.client import (
    DEFAULT_PORTS,
    AttributesClient,
    ClientSecurity,
    ClientSecurityError,
    CounterfactualClient,
    DecodingClient,
    DirectionsClient,
    DiscoveryResult,
    EmbeddingClient,
    Facexplain,
    folder_dataset,
    image_from_path,
    image_pair,
    inline_dataset,
    labeled_image,
    open_channel,
    server_dataset,
    set_ref,
    template_array,
    wait_ready,
)

__all__ = [
    "DEFAULT_PORTS",
    "AttributesClient",
    "AuditConfig",
    "AuditError",
    "ClientSecurity",
    "ClientSecurityError",
    "CounterfactualClient",
    "DecodingClient",
    "DirectionsClient",
    "DiscoveryResult",
    "EmbeddingClient",
    "Facexplain",
    "folder_dataset",
    "image_from_path",
    "image_pair",
    "inline_dataset",
    "labeled_image",
    "open_channel",
    "run_audit",
    "server_dataset",
    "set_ref",
    "template_array",
    "wait_ready",
]
