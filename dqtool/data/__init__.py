"""Floor 1, data: text pairs from local files (:mod:`~dqtool.data.pairs`) and the metrics
that score generations against them (:mod:`~dqtool.data.metrics`). Imports only
:mod:`dqtool.base`.
"""
