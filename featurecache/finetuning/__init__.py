"""Stage three and what follows it: the network of a run, its training, export and prediction.

Owns the network assembled from a run and its two files (:mod:`~featurecache.finetuning.network`),
the LP-FT trainer with checkpoints and resume (:mod:`~featurecache.finetuning.trainer`, behind
``featurecache.finetune``), the blocks ``--unfreeze`` counts (:mod:`~featurecache.finetuning.blocks`),
training the last blocks from stored activations (:mod:`~featurecache.finetuning.activations`),
and prediction from a fine-tuned folder or a stage-two run
(:mod:`~featurecache.finetuning.prediction`, behind ``featurecache.predict``).

Layer: finetuning. May import: the shared modules, data, backbones, extraction, heads, sweep.
"""
