"""
The control plane ("pilot") and the persistent channel between it and the
proxies.

L{txmesh.pilot.messages} is the channel's sans-IO message layer: framing,
messages and the pilot's per-proxy sync bookkeeping. The channel's TLS
transport, the pilot service and the proxy's client are not built yet.
"""
