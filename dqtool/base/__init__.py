"""Floor 0, base: what every other floor may use — the one exception type and the version.

Imports nothing from dqtool.
"""
