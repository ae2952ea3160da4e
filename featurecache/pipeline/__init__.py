"""Pipelines: TOML files that chain the stages, the fetchers of their data, and the demo.

Owns the pipeline files of ``fc run`` (:mod:`~featurecache.pipeline.run`), the fetchers that put
data where a pipeline expects it (:mod:`~featurecache.pipeline.fetchers`: the digits as images,
zip archives), and ``fc demo`` with its package data ``demo.toml``.

Layer: pipeline. May import: the shared modules and every stage below it (through
:mod:`featurecache.stages` for the stage functions).
"""
