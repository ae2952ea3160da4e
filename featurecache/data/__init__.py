"""Where images come from, and how they become tensors.

Owns records, datasets and the protocol of a data source (:mod:`~featurecache.data.records`), the
data sources (folder trees, CSV manifests, torchvision datasets and the registry in
:mod:`~featurecache.data.sources`, WebDataset shards in :mod:`~featurecache.data.webdataset`,
Parquet files and Hugging Face datasets in :mod:`~featurecache.data.tables`), registered by
scheme, that turn what the user points at into a :class:`~featurecache.data.sources.Dataset` of records, the
:class:`~featurecache.data.preprocess.Preprocess` transform, and decoding
(:mod:`featurecache.data.images`). It knows nothing about models.

Layer: data. May import: the shared modules.
"""
