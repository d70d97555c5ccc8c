"""The ``plot`` entry points: the standard figure sets of a sweep folder and of a fit.

``moe-sweep plot DIR`` and ``moe-fit ... --plot OUT_DIR`` call the two helpers here:

* :func:`add_sweep_plot_parser` registers ``plot DIR [--out OUT] [--json]`` on a subparsers object
  and :func:`sweep_plot_main` runs it: the sweep figures of :func:`moe_scaling.plots.runs.sweep_figures`
  (and :func:`moe_scaling.plots.isoflop.isoflop_figure` and
  :func:`~moe_scaling.plots.isoflop.layout_minima_figure` for a study of several sizes per budget)
  written as PNG + SVG into ``DIR/plots/`` (or ``--out``).
* :func:`add_fit_plot_argument` adds ``--plot OUT_DIR`` to ``moe-fit`` and :func:`fit_plot` writes
  the fit figures of :func:`moe_scaling.plots.fits.fit_figures` into that folder.

Run on its own, ``python -m moe_scaling.cli.plot DIR`` is ``moe-sweep plot DIR``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from moe_scaling.cli._common import make_parser, print_json, run_cli
from moe_scaling.errors import InputError
from moe_scaling.sweep.layout import SweepDir

PROG = "moe-sweep plot"
EXAMPLES = """\
  moe-sweep plot results/quickstart                 # writes results/quickstart/plots/*.png|svg
  moe-sweep plot results/quickstart --out figures/ --json
"""
HELP = "the standard figures of a sweep folder, as PNG and SVG, into DIR/plots/"


def load_sweep(directory: str | Path):
    """``(runs, curves)`` of a sweep folder; a missing folder or table is an :class:`InputError`."""
    import pandas as pd

    directory = Path(directory)
    layout = SweepDir(directory)
    runs_path, curves_path = layout.runs_table, layout.curves_table
    if not runs_path.is_file():
        raise InputError(f"{directory}: no {runs_path.name}; give the --out folder of a moe-sweep run")
    runs = pd.read_parquet(runs_path)
    curves = pd.read_parquet(curves_path) if curves_path.is_file() else None
    return runs, curves


def _write(figures: Mapping[str, Any], out: Path) -> dict[str, list[str]]:
    from moe_scaling.plots.style import save_figure

    return {name: [str(p) for p in save_figure(fig, out / name)] for name, fig in figures.items()}


def add_sweep_plot_arguments(parser) -> None:
    parser.add_argument("dir", metavar="DIR", help="sweep folder (holds runs.parquet, curves.parquet)")
    parser.add_argument("--out", default=None, help="folder for the figures (default DIR/plots)")
    parser.add_argument("--json", action="store_true", help="print the written files as JSON")


def add_sweep_plot_parser(subparsers) -> None:
    """Register the ``plot`` subcommand on an ``argparse`` subparsers object."""
    add_sweep_plot_arguments(subparsers.add_parser("plot", help=HELP))


def sweep_plot_main(args) -> int:
    """Write the sweep figures of ``args.dir`` into ``args.out`` (default ``DIR/plots``); print
    one line per figure (or JSON ``{"out", "figures": {name: [png, svg]}}`` with ``args.json``)."""
    from moe_scaling.plots.isoflop import isoflop_figure, layout_minima_figure
    from moe_scaling.plots.runs import sweep_figures

    runs, curves = load_sweep(args.dir)
    out = Path(args.out) if getattr(args, "out", None) else SweepDir(args.dir).plots
    try:
        figures = sweep_figures(runs, curves)
    except ValueError as err:
        raise InputError(f"{args.dir}: {err}") from None
    iso = isoflop_figure(runs)          # a study with several sizes per training-compute budget
    if iso is not None:
        figures["isoflop"] = iso
        minima = layout_minima_figure(runs)    # each layout's best size against dense's
        if minima is not None:
            figures["layout_minima"] = minima
    written = _write(figures, out)
    if getattr(args, "json", False):
        print_json({"out": str(out), "figures": written})
    else:
        for name, paths in written.items():
            print(f"{name}: {', '.join(paths)}")
    return 0


def add_fit_plot_argument(parser) -> None:
    """Add ``--plot OUT_DIR`` to the ``moe-fit`` parser."""
    parser.add_argument("--plot", default=None, metavar="OUT_DIR",
                        help="write the fit's figures (law vs runs, predicted vs observed, residuals; "
                             "with a budget: frontiers, iso-loss, published models; with --budget-mem "
                             "alone: best MoE and best dense by training compute) as PNG + SVG")


def fit_plot(fit: Any, out_dir: str | Path, *, runs: Any = None, columns: Mapping[str, str] | None = None,
             results: Sequence[Any] = (), heldout: Sequence[str] | None = None,
             by_compute: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
    """Write the fit figures (:func:`moe_scaling.plots.fits.fit_figures`) into ``out_dir``.

    ``fit`` is a ``fit.Fit``. ``runs`` is the table it was fitted on, or the path ``moe-fit`` was
    given (a sweep folder or table, read with ``fit.load_runs`` and ``columns``; a ``.json`` fit
    has no runs, so the data figures are left out). ``results`` holds each budget search's result as a
    dict: ``SearchResult.to_dict()``, or the ``moe-fit --json`` result dict, which holds its keys
    (a ``SearchResult`` object is refused: call ``.to_dict()``; entries without a sweet spot are
    skipped); ``heldout`` run ids to highlight (default: the fit's own held-out
    runs); ``by_compute`` the memory-only answer (``ByCompute.to_dict()``, the ``by_compute`` value of
    ``moe-fit --budget-mem M --json``): adds ``by_compute_<budget>``. Returns ``{figure name: [png
    path, svg path]}``.
    """
    from moe_scaling.plots.fits import fit_figures

    if isinstance(runs, (str, Path)):
        if str(runs).lower().endswith(".json"):
            runs = None
        else:
            from moe_scaling.laws.tables import load_runs

            runs = load_runs(runs, columns)[0]
    return _write(fit_figures(fit, runs=runs, results=results, heldout=heldout, by_compute=by_compute),
                  Path(out_dir))


def _body(argv: Sequence[str] | None) -> int:
    parser = make_parser(PROG, "Write the standard figures of a sweep folder (loss vs memory and "
                         "vs FLOPs with the Pareto frontier, training curves, expert load) as PNG "
                         "and SVG.", EXAMPLES)
    add_sweep_plot_arguments(parser)
    return sweep_plot_main(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, _body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
