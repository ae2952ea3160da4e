"""Where images come from, and how they become tensors.

Owns the data sources (folder trees, CSV manifests, torchvision datasets) that turn what the
user points at into a :class:`~featurecache.data.sources.Dataset` of records, the
:class:`~featurecache.data.preprocess.Preprocess` transform, and decoding
(:mod:`featurecache.data.images`). It knows nothing about models.

Layer: data. May import: the shared modules.
"""
