"""
Access policy for txmesh: Istio's C{AuthorizationPolicy}, as a pure
evaluation engine (L{txmesh.policy.authorization}) and the translation of
Istio documents into it (L{txmesh.policy.istio_security}).
"""
