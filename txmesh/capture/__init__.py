"""
Transparent traffic capture: the netfilter rules that send a workload's
TCP traffic through its sidecar (L{txmesh.capture.iptables}, applied by
L{txmesh.capture.apply} and the C{txmesh iptables} command), and the
C{SO_ORIGINAL_DST} lookup that tells the sidecar where a redirected
connection was going (L{txmesh.capture.original_dst}).

See C{docs/capture.md}.
"""
