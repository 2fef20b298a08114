"""Video networks (C3D, two-stream) on visionops' 3D convolution, with a ``backend="pytorch"`` twin.

Conventions: visionops/models/README.md.
"""
