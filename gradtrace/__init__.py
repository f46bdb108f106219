"""gradtrace's top floor: the ``gradtrace`` command line (:mod:`gradtrace.cli`), the demo and the
HTML report (:mod:`gradtrace.report`).

The only package (with :mod:`experiments` and the tests) that imports every stage: the format
layer (:mod:`gradtrace_format`), :mod:`capture`, :mod:`analysis` and :mod:`experiments`. The
commands that record (``record``, ``demo``) import torch only when they run.
"""
