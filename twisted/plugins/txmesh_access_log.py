"""
The C{access_log} HTTP filter (L{txmesh.filters.access_log}) as a Twisted
plugin, found by name through L{twisted.plugin.getPlugins}.
"""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import alsoProvides

from txmesh.filters.access_log import AccessLogFactory

accessLog = AccessLogFactory()
alsoProvides(accessLog, IPlugin)
