"""
Declares the example filters as Twisted plugins: txmesh finds them by name.
"""

from twisted.plugin import IPlugin
from txmesh_examples.add_header import AddHeaderFactory
from txmesh_examples.reject_header import RejectByHeaderFactory
from zope.interface import alsoProvides

addHeader = AddHeaderFactory()
alsoProvides(addHeader, IPlugin)
rejectHeader = RejectByHeaderFactory()
alsoProvides(rejectHeader, IPlugin)
