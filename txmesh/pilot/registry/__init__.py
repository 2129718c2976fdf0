"""
Service discovery for the pilot: sources of services and their endpoints
behind one interface, L{IRegistry}.

  - L{txmesh.pilot.registry.file.FileRegistry}: YAML service registrations,
    a file or a directory, watched by polling.
  - L{txmesh.pilot.registry.dns.DNSRegistry}: A/AAAA/SRV names resolved with
    C{twisted.names}, re-resolved on their TTL.
  - L{txmesh.pilot.registry.etcd.EtcdRegistry}: one key per service under a
    prefix of an etcd v3 server (JSON gateway), range then watch, resumed
    from its revision.
  - L{txmesh.pilot.registry.kubernetes.KubernetesRegistry}: Services,
    EndpointSlices and Pods by list + watch with C{resourceVersion}.
  - L{CombinedRegistry}: several registries seen as one.

The pilot's C{mesh.yaml} chooses and combines them
(L{txmesh.pilot.mesh_config}; C{docs/registries.md}).

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
