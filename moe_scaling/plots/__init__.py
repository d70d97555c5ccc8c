"""Figures of the pipeline's outputs, one module per kind of input (nothing is re-exported here):

* :mod:`.style`: saving (PNG + reproducible SVG), axis units, palettes, markers, legends, axis
  helpers, label placement, and the text of budgets and laws shared by the figure modules;
* :mod:`.runs`: figures of a sweep's runs table and curves (loss vs memory and vs FLOPs with the
  Pareto frontier, training curves, expert load) and the run helpers;
  :func:`~.runs.sweep_figures` is ``moe-sweep plot``;
* :mod:`.published`: the published models on the memory and FLOPs axes, alone or beside a search;
* :mod:`.search`: figures of a sweet-spot search, given as the dict of ``SearchResult.to_dict()``
  (predicted frontiers, the optimum vs budget, iso-loss contours);
* :mod:`.fits`: figures of a fitted law against its runs; :func:`~.fits.fit_figures` is
  ``moe-fit --plot``.

Within the package: style < runs < published < search < fits (each imports only the ones before it).
"""
