"""Stage one: run a frozen backbone over a dataset and write its features to the cache.

Owns the loop over batches (:mod:`featurecache.extraction.stage`, behind ``featurecache.extract``),
in one process, one torchrun rank of many, or one ``--shard I/N`` slice
(:mod:`featurecache.extraction.distributed`). The package is not called ``extract`` so that
importing it never shadows the function ``featurecache.extract``.

Layer: extraction. May import: the shared modules, data, backbones.
"""
