"""SiamFC tracking on visionops' cross-correlation, with a ``backend="pytorch"`` twin.

Conventions: visionops/models/README.md.
"""
