"""gradtrace's paper harness: the training runs behind the README's and the papers' figures.

Recipes (:mod:`experiments.recipes`: named presets, ``load_config``, ``run_recipe``), the
training loop that records them (:mod:`experiments.train`), models, datasets, optimizers and
learning-rate schedules (:mod:`experiments.models`, :mod:`experiments.data`,
:mod:`experiments.optim`), objectives and GAWU (:mod:`experiments.objectives`,
:mod:`experiments.gawu`), full-batch gradients (:mod:`experiments.fullbatch`), and the
studies that start from a recorded store: zoom branches, interpolation, DSS and recomputed
gradients (:mod:`experiments.zoom`, :mod:`experiments.interpolate`, :mod:`experiments.dss`,
:mod:`experiments.recompute`).

It sits above both stages: it records with :mod:`capture` and reads stores back with
:mod:`analysis`; neither stage imports it. It needs the ``experiments`` extra (torch,
torchvision, scikit-learn, mnist1d): ``pip install "gradtrace[experiments]"``.
"""
