"""Backbones addressable by name: torchvision and timm models behind one protocol.

Owns the backbone sources and their registry, weights identity and import, and the taps
that pool intermediate layers (:mod:`featurecache.backbones.models`). It knows nothing
about HDF5 or heads.

Layer: backbones. May import: the shared modules, data.
"""
