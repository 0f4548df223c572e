"""Floor 3, model surgery on Hugging Face seq2seq models: the architecture registry
(:mod:`~dqtool.model.registry`), layer maps (:mod:`~dqtool.model.layermap`), QAT modules
(:mod:`~dqtool.model.qmodules`), packed modules (:mod:`~dqtool.model.packed`) and the
distillation losses (:mod:`~dqtool.model.losses`). No files: imports only :mod:`dqtool.qmath`
and :mod:`dqtool.base`.
"""
