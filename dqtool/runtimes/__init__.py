"""Floor 5, runtimes: what runs a model folder once it is loaded.

* :mod:`~dqtool.runtimes.load` — any model folder (detected and verified by
  :mod:`dqtool.formats`) as a model with Hugging Face's ``generate``;
* :mod:`~dqtool.runtimes.ort` — ONNX Runtime sessions over an optimum-layout folder;
* :mod:`~dqtool.runtimes.genconfig` — Hugging Face's generation-config rules;
* :mod:`~dqtool.runtimes.search` — greedy and beam search in numpy (the ONNX runtime's);
* :mod:`~dqtool.runtimes.textgen` — batched text generation for any such model;
* :mod:`~dqtool.runtimes.ctranslate2` — a CTranslate2 folder with Hugging Face's ``generate``.
"""
