"""``moe-sweep dashboard``: optuna-dashboard on a sweep's own storage (the ``dashboard`` extra).

The queue of a sweep is an optuna study (:mod:`moe_scaling.sweep.queue`), so the dashboard reads it
as it is, while the sweep runs or after: one trial per run attempt, its flat user attributes (the
axes, the sparsity vocabulary, parameter counts, status), its eval losses as intermediate values by
step (the learning curve), its final eval loss as the value, and its state (COMPLETE, PRUNED =
diverged, FAIL = failed or an interrupted attempt, RUNNING, WAITING).
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_scaling.errors import ConfigError
from moe_scaling.sweep.layout import SweepDir
from moe_scaling.sweep.queue import check_storage_url, open_study, redact

__all__ = ["sweep_storage", "study_from_tables", "serve"]


def sweep_storage(out: str | Path, storage: str | None = None) -> tuple[str, str]:
    """``(storage URL, study name)`` of the sweep folder ``out``: ``storage`` when given, else the one
    its manifest names (a password is never stored there: give ``--storage`` for such a server)."""
    layout = SweepDir(out)
    if not layout.manifest.is_file():
        raise ConfigError(f"{out}: no sweep.json; give the --out folder of a moe-sweep run")
    manifest = json.loads(layout.manifest.read_text())
    url = storage or manifest.get("storage") or layout.default_storage
    check_storage_url(url)
    return url, manifest["name"]


def study_from_tables(out: str | Path, name: str):
    """The sweep as an in-memory optuna study rebuilt from ``runs.parquet`` and ``curves.parquet``
    (a copied or committed sweep folder whose queue database is not there): one trial per run, in
    the state, value, intermediate values and user attributes the live queue gives it."""
    import math

    import optuna
    import pandas as pd

    from moe_scaling.sweep.queue import END_STATES
    from moe_scaling.sweep.runner import trial_axes
    from moe_scaling.sweep.grid import RunSpec

    layout = SweepDir(out)
    if not layout.runs_table.is_file():
        raise ConfigError(f"{out}: neither the sweep's storage nor runs.parquet is here; give --storage")
    runs = pd.read_parquet(layout.runs_table)
    curves = pd.read_parquet(layout.curves_table) if layout.curves_table.is_file() else None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, direction="minimize",
                                storage=optuna.storages.InMemoryStorage())
    for row in runs.sort_values("run_id").to_dict("records"):
        curve = {} if curves is None else {
            int(s): float(v) for s, v in curves.loc[curves["run_id"] == row["run_id"], ["step", "eval_loss"]]
            .itertuples(index=False) if v is not None and math.isfinite(v)}
        spec = RunSpec.from_dict(_sections(row))
        state = END_STATES.get(row["status"], optuna.trial.TrialState.FAIL)
        done = state == optuna.trial.TrialState.COMPLETE and row["eval_loss"] is not None
        study.add_trial(optuna.trial.create_trial(
            state=state, value=float(row["eval_loss"]) if done else None, intermediate_values=curve,
            user_attrs={"run_id": row["run_id"], "status": row["status"], **trial_axes(spec)}))
    return study


def _sections(row: dict) -> dict:
    """A runs.parquet row as the (model, train, data) sections of a RunSpec."""
    import dataclasses

    from moe_scaling.config import DataConfig, ModelConfig, TrainConfig

    def pick(cls):
        return {f.name: _plain(row[f.name]) for f in dataclasses.fields(cls) if f.name in row}
    train = pick(TrainConfig) | {"tokens": row.get("tokens_budget", row["tokens"])}
    return {"model": pick(ModelConfig), "train": train, "data": pick(DataConfig)}


def _plain(v):
    """NumPy scalars and NaN (pandas' missing) as plain Python values."""
    if hasattr(v, "item"):
        v = v.item()
    return None if isinstance(v, float) and v != v else v


def serve(out: str | Path, storage: str | None = None, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve optuna-dashboard on the sweep's storage until interrupted (one-line errors for a
    missing extra, a missing sweep or an unreachable storage). Without ``storage``, a sweep folder
    whose SQLite queue is not there (a committed or copied folder) is shown from its tables."""
    try:
        import optuna_dashboard
    except ImportError:
        raise ConfigError("moe-sweep dashboard needs the dashboard extra: pip install -e '.[dashboard]'") from None
    url, name = sweep_storage(out, storage)
    if storage is None and url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        study, source = study_from_tables(out, name), "runs.parquet and curves.parquet"
    else:
        try:
            study = open_study(url, name, create=False)      # an unreachable storage stops here
        except KeyError:
            raise ConfigError(f"--storage = {redact(url)!r}: holds no study {name!r}; give the storage the "
                              "sweep ran on") from None
        source = redact(url)
    print(f"moe-sweep: dashboard of study {name!r} ({source}) at http://{host}:{port}/dashboard/studies/"
          f"{study._study_id} (Ctrl-C stops it)", flush=True)
    optuna_dashboard.run_server(study._storage, host=host, port=port)
