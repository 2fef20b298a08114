"""Detection networks (two-stage R-CNNs, SSD, RetinaNet) on visionops' ops, with a ``backend="pytorch"`` twin.

Conventions: visionops/models/README.md.
"""
