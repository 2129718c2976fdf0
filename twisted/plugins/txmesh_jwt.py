"""
The C{jwt} HTTP filter (L{txmesh.filters.jwt_authn}) as a Twisted plugin,
found by name through L{twisted.plugin.getPlugins}.
"""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import alsoProvides

from txmesh.filters.jwt_authn import JwtAuthnFactory

jwt = JwtAuthnFactory()
alsoProvides(jwt, IPlugin)
