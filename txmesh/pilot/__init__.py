"""
The control plane ("pilot") and the persistent channel between it and the
proxies.

L{txmesh.pilot.service} is the pilot (C{twistd txmesh-pilot}),
L{txmesh.pilot.server} the channel's server side over TLS,
L{txmesh.pilot.messages} its sans-IO message layer (framing, messages,
per-proxy sync bookkeeping), L{txmesh.pilot.snapshot} and
L{txmesh.pilot.gateways} what each proxy is pushed; the proxy's side is
L{txmesh.proxy.pilot_client}.
"""
