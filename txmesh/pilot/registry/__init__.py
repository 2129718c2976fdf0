"""
Service discovery for the pilot: sources of services and their endpoints
behind one interface, L{IRegistry}.

  - L{txmesh.pilot.registry.file.FileRegistry}: YAML service registrations,
    a file or a directory, watched by polling.
  - L{txmesh.pilot.registry.dns.DNSRegistry}: A/AAAA/SRV names resolved with
    C{twisted.names}, re-resolved on their TTL.
  - L{CombinedRegistry}: several registries seen as one.

A registry that fails keeps its last known view and says so in C{status()}
and in the log.
"""

from txmesh.pilot.registry.base import (
    CombinedRegistry,
    IRegistry,
    RegistryState,
    ServiceEndpoints,
    ServicePort,
)
from txmesh.pilot.registry.dns import DNSRegistry
from txmesh.pilot.registry.file import FileRegistry

__all__ = ["CombinedRegistry", "DNSRegistry", "FileRegistry", "IRegistry", "RegistryState",
           "ServiceEndpoints", "ServicePort"]
