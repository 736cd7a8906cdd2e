"""Any CSV with a label column (and a site column, or a Dirichlet label-skew split): a consortium's own exports.

Cells are read by protocol.tabular (missing markers NA / empty / ? by default, thousands separators, a TableError
naming file, column and row for anything else). Features stay RAW (NaN for missing) with their schema
(protocol.features.FeatureSchema: numeric columns, categorical ones one-hot over their levels or refused): the
federation computes the scaling itself (experiments.sim.statistics.federated_standardize), no pooled statistic is
used here. The label and site columns are validated (present, no missing value, >= 2 classes, every site with
rows); `describe()` gives the class balance and the per-site sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.datasets.federation import Client, Federation
from experiments.datasets.partition import dirichlet_label_skew
from protocol.features import FeatureSchema
from protocol.tabular import ReadOptions, Table, TableError, read_table

MAX_CLASSES = 64


def _labels(table: Table, label: str, options: ReadOptions) -> list[str]:
    cells = table.column(label)
    for row, cell in enumerate(cells, start=2):
        if cell in options.missing:
            raise TableError(table.path, f"the label is missing ({cell!r})", label, row)
    return cells


def _check_classes(path, label: str, classes: list[str]) -> None:
    if len(classes) < 2:
        raise TableError(path, f"the label has one class only ({classes}): nothing to learn", label)
    if len(classes) > MAX_CLASSES:
        raise TableError(path, f"{len(classes)} distinct labels (> {MAX_CLASSES}): not a class column?", label)


def load_csv_federation(path: str | Path, label: str, site: str | None = None, test_fraction: float = 0.25,
                        seed: int = 0, edge_column: str | None = None, test_path: str | Path | None = None,
                        options: ReadOptions = ReadOptions(), categorical: str = "onehot", sites: int = 5,
                        alpha: float = 0.5) -> Federation:
    """One client per value of `site` (or, with site=None, `sites` clients by a Dirichlet(`alpha`) label skew drawn
    with `seed`), a stratified `test_fraction` held out (or the rows of `test_path`, a CSV with the same columns).
    Raises TableError (one line: file, column, row) for anything malformed."""
    table = read_table(path, options)
    for needed, what in ((label, "label"), (site, "site"), (edge_column, "edge")):
        if needed is not None and needed not in table.columns:
            raise TableError(path, f"no {what} column {needed!r} (columns: {', '.join(table.columns)})")
    if site is not None and site == label:
        raise TableError(path, "the site column cannot be the label", site)
    cells = _labels(table, label, options)
    test_table = read_table(test_path, options) if test_path is not None else None
    test_cells = _labels(test_table, label, options) if test_table is not None else []
    classes = sorted(set(cells))
    _check_classes(path, label, classes)
    unseen = sorted(set(test_cells) - set(classes))
    if unseen:
        raise TableError(test_path, f"labels {unseen} do not occur in the training file", label)
    schema = FeatureSchema.infer(table, exclude=[c for c in (label, site, edge_column) if c], options=options,
                                 categorical=categorical)
    x = schema.encode(table, options)
    y = np.array([classes.index(c) for c in cells], np.int64)
    rng = np.random.default_rng(seed)
    if test_table is not None:
        missing = [c for c in [*schema.numeric, *(n for n, _ in schema.categorical)] if c not in test_table.columns]
        if missing:
            raise TableError(test_path, f"no column(s) {missing} that the training file has")
        x_test, y_test = schema.encode(test_table, options), np.array([classes.index(c) for c in test_cells])
        train = np.ones(len(y), bool)
    else:
        train = np.ones(len(y), bool)
        for k in range(len(classes)):   # stratified hold-out
            members = rng.permutation(np.flatnonzero(y == k))
            train[members[: int(round(len(members) * test_fraction))]] = False
        x_test, y_test = x[~train], y[~train]
    rows = np.flatnonzero(train)
    if site is not None:
        site_cells = np.array(table.column(site))
        for row, cell in enumerate(site_cells, start=2):
            if cell in options.missing:
                raise TableError(path, f"the site is missing ({cell!r})", site, row)
        names = sorted(set(site_cells[rows]))
        groups = [(s, rows[site_cells[rows] == s]) for s in names]
        edges = np.array(table.column(edge_column)) if edge_column else site_cells
    else:
        parts = dirichlet_label_skew(y[rows], sites, alpha, rng)
        groups = [(f"site{i + 1}", rows[p]) for i, p in enumerate(parts)]
        edges = None
    clients = []
    for name, idx in groups:
        if len(idx) == 0:
            continue
        edge = _safe_id(edges[idx[0]]) if edges is not None else _safe_id(name)
        clients.append(Client(id=_safe_id(name), edge=edge, x=x[idx], y=y[idx], site=str(name)))
    if len({c.id for c in clients}) != len(clients):
        raise TableError(path, "two site names map to the same device id after sanitising", site)
    return Federation(name=Path(path).stem, clients=clients, x_test=x_test, y_test=y_test,
                      model="vitals_mlp" if len(classes) == 2 else "har_mlp",
                      model_options={"n_features": schema.n_features}, classes=classes, schema=schema.to_dict())


def _safe_id(value: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(value))[:64] or "site"
