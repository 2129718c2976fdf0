"""
The C{tracing} HTTP filter (L{txmesh.filters.tracing}) as a Twisted plugin,
found by name through L{twisted.plugin.getPlugins}.
"""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import alsoProvides

from txmesh.filters.tracing import TracingFactory

tracing = TracingFactory()
alsoProvides(tracing, IPlugin)
