"""moe-scaling: which Mixture-of-Experts architecture gives the lowest loss for a given on-device
memory and compute budget?

The package follows the pipeline, one subpackage per stage. Imports go one way only: a module may
import from its own layer and the layers before it, never from a later one
(``tests/test_layers.py`` reads every import and enforces this order)::

    core      config, errors, units, files, costs, runtime   configs, error types, units, atomic files,
                                                            parameter/FLOP/byte counts, process setup
    model     the network: transformer, routing
    train     corpora and tokens, the train step, the loop, checkpoints, a run's folder
    sweep     grid files, the optuna-storage queue, the runner, progress, results tables, SweepDir
    laws      the law registry, run tables, the batched L-BFGS optimiser, fitting and selection
    hf        every Hugging Face convention: config import/export, the architecture map, weights
    ondevice  the on-device runtime: ONNX Runtime export (INT4 weights, QMoE), sessions, latency
    design    the budget search (typed candidates) and the builder of full-size model folders
    plots     style, run figures, fit figures, search figures
    cli       thin console scripts: parse arguments, call one library function, print

The formulas and design decisions the code cites live in ``docs/design.md``.
"""

from moe_scaling.runtime import keep_freed_memory

keep_freed_memory()  # before JAX starts its CPU threads: 25-30% faster train steps (runtime.py)

__version__ = "0.1.0"
