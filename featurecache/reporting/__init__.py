"""Pages a person reads: a run's report, runs side by side, the list of runs.

Owns one document module that renders Markdown and HTML for every page
(:mod:`~featurecache.reporting.document`), the run report (:mod:`~featurecache.reporting.pages`,
behind ``featurecache.report``), the comparison of runs (:mod:`~featurecache.reporting.compare`) and
the list of runs (:mod:`~featurecache.reporting.listing`, behind ``featurecache.list_runs``).

Layer: reporting. May import: the shared modules and every stage below it.
"""
