"""Training: the paper's three stages, the reranker trainer, losses, mining and the judge.

Every stage is a ``Trainer`` subclass (``loop.py``) driven by a YAML config
(``config.py``); ``commands.py`` exposes them as ``magic-mm train …``.
"""
