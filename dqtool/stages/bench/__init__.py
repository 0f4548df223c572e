"""Stage ``bench``: footprint, latency and quality of dqtool's outputs and of the peers.

:mod:`~dqtool.stages.bench.stage` measures and reports, :mod:`~dqtool.stages.bench.peers`
builds the peers, :mod:`~dqtool.stages.bench.target` is what both hand over.
"""
