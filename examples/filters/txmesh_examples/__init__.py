"""
Example txmesh filters, shipped as Twisted plugins.
"""
