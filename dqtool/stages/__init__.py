"""Floor 6, stages: one module (or package) per ``dqtool`` command — distill, qat, convert,
export, evaluate, bench (with its peers). A stage reads folders through :mod:`dqtool.formats`
and runs models through :mod:`dqtool.runtimes`; stages never import each other (the
import-linter contract in pyproject.toml checks it). :mod:`dqtool.compress` chains them.
"""
