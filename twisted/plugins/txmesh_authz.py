"""
The built-in C{authz} filter (Istio authorization policies) as a Twisted
plugin, found by name through L{twisted.plugin.getPlugins}.
"""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import alsoProvides

from txmesh.filters.authz import AuthzFactory

authz = AuthzFactory()
alsoProvides(authz, IPlugin)
