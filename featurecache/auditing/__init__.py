"""What the cached features reveal about the data: ``fc audit`` (:func:`featurecache.audit`).

From one cache alone, without decoding an image (but for the thumbnails of the page):

- :mod:`.neighbours`: the nearest rows of every row by cosine similarity, exact up to
  :data:`.neighbours.EXACT_MAX_ROWS` rows, above that with a faiss inverted-file index
  (``pip install 'featurecache[audit]'``);
- :mod:`.duplicates`: byte-identical files (the content hashes stage one records) and
  near-duplicates (cosine at or above a threshold), classed as leaks across splits, label
  conflicts within one, or plain duplicates; outliers by their distance to their neighbours;
- :mod:`.labels`: likely label errors by confident learning (cleanlab) on the out-of-fold
  probabilities of a calibrated head;
- :mod:`.stage`: :func:`audit` itself, ``audit.json`` and the lists ``fc audit --list`` prints;
- :mod:`.page`: the HTML page with thumbnails.

The subpackage is named ``auditing`` so that it never shadows the function ``featurecache.audit``.

Layer: auditing. May import: the shared modules, data, backbones, extraction, heads, sweep.
"""
