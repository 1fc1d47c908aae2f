"""Applications built on the library: the one-command demo and the memory benchmark.

``python -m resode_lightning.apps.demo`` (``make demo``) runs the demo;
:mod:`~resode_lightning.apps.memory_benchmark` is what ``resode bench`` and
``benchmarks/memory.py`` run. Neither is part of the promised API, which is the top-level
``resode_lightning``.
"""
