"""Segmentation networks (DeepLab) on visionops' dilated convolution, with a ``backend="pytorch"`` twin.

Conventions: visionops/models/README.md.
"""
