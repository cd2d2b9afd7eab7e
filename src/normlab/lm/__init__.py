"""The trainer wing: character-level language models on the bundled names, built on the library.

Its config (``config``, ``presets``), data, model and init schemes, the training step (eager
and compiled), the loop and its run folder, sampling, evaluation, export, the lecture's
experiments and the ``normlab`` command. It uses the library wing (``normlab.nn``,
``normlab.diagnostics``, ``normlab.lsuv``, ...) only through its public names; the library
knows nothing of it.
"""
