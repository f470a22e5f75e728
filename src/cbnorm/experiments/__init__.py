"""The experiment harness: data, models, training, metrics, plots and the ``cbnorm`` command line.

It depends on the library (:mod:`cbnorm`); the library never imports it.
"""
