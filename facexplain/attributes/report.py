"""Importance tables as files: CSV, JSON, a bar chart, and an MLflow run holding all three.

Shared by the service (``log_run``) and the CLI (``facexplain attributes importance``), so a table
looks the same wherever it is written. Rows are anything with the ``ImportanceRow`` fields
(``attribute``, ``group``, ``mi``, ``ci_low``, ``ci_high``, ``control_mi``, ``n``, ``p_value``): the proto message
or :class:`facexplain.attributes.importance.ImportanceRow`. Nothing here touches images or templates.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROW_FIELDS = ("attribute", "group", "mi", "ci_low", "ci_high", "control_mi", "n", "p_value")
# per-model columns of the side-by-side CSV
_MODEL_FIELDS = ("mi", "ci_low", "ci_high", "control_mi", "n", "p_value")


def row_dict(row: Any) -> dict[str, Any]:
    """One row as plain values (floats, the attribute name and group, the face count)."""
    return {
        "attribute": str(row.attribute),
        "group": str(row.group),
        "mi": float(row.mi),
        "ci_low": float(row.ci_low),
        "ci_high": float(row.ci_high),
        "control_mi": float(row.control_mi),
        "n": int(row.n),
        "p_value": float(row.p_value),
    }


def write_csv(rows: Sequence[Any], path: Path | str) -> Path:
    """``attribute,group,mi,ci_low,ci_high,control_mi,n,p_value`` (MI in nats), one line per attribute, in order."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ROW_FIELDS))
        writer.writeheader()
        for r in rows:
            d = row_dict(r)
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in d.items()})
    return out


def write_compare_csv(tables: Sequence[tuple[str, Sequence[Any]]], path: Path | str) -> Path:
    """Several models' tables side by side: ``attribute,group`` then ``<label>_mi, _ci_low, _ci_high, _control_mi, _n,
    _p_value`` per model; attributes in the first table's order, then any only the others have."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    order: list[str] = []
    groups: dict[str, str] = {}
    by_label: list[tuple[str, dict[str, dict[str, Any]]]] = []
    for label, rows in tables:
        d = {}
        for r in rows:
            rd = row_dict(r)
            d[rd["attribute"]] = rd
            if rd["attribute"] not in groups:
                groups[rd["attribute"]] = rd["group"]
                order.append(rd["attribute"])
        by_label.append((label, d))
    fields = ["attribute", "group"]
    for label, _d in by_label:
        fields += [f"{label}_{k}" for k in _MODEL_FIELDS]
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        for name in order:
            line: list[Any] = [name, groups[name]]
            for _label, d in by_label:
                r = d.get(name)
                if r is None:
                    line += [""] * len(_MODEL_FIELDS)
                else:
                    line += [r[k] if k == "n" else f"{r[k]:.6f}" for k in _MODEL_FIELDS]
            writer.writerow(line)
    return out


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def importance_chart(
    tables: Sequence[tuple[str, Sequence[Any]]], path: Path | str, title: str = "", show_control: bool = True
) -> Path:
    """Horizontal bar chart of I(a; â) per attribute, one bar per model (``tables``: (label, rows) pairs).

    Whiskers span the bootstrap interval (ci_low..ci_high); a black tick marks each bar's shuffled
    control MI (when ``show_control`` and any control is non-zero). Attributes keep the first table's
    order (the service's: MI descending), top to bottom.
    """
    import matplotlib  # heavy, and only the chart needs it: the CSV/JSON writers stay light

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order: list[str] = []
    for _label, rows in tables:
        for r in rows:
            if str(r.attribute) not in order:
                order.append(str(r.attribute))
    n_models = max(1, len(tables))
    height = 0.8 / n_models
    fig_h = max(3.0, 0.28 * len(order) * max(1.0, n_models * 0.7) + 1.2)
    fig, ax = plt.subplots(figsize=(8.0, fig_h))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    y_index = {name: len(order) - 1 - i for i, name in enumerate(order)}  # first attribute on top
    any_control = False
    for m, (label, rows) in enumerate(tables):
        d = {str(r.attribute): row_dict(r) for r in rows}
        names = [n for n in order if n in d]
        ys = [y_index[n] + (n_models - 1 - 2 * m) * height / 2 for n in names]
        mi = [_finite(d[n]["mi"]) for n in names]
        lo = [max(0.0, v - _finite(d[n]["ci_low"])) for n, v in zip(names, mi, strict=True)]
        hi = [max(0.0, _finite(d[n]["ci_high"]) - v) for n, v in zip(names, mi, strict=True)]
        ax.barh(ys, mi, height=height * 0.9, color=colours[m % len(colours)], label=label, xerr=[lo, hi], capsize=2)
        controls = [_finite(d[n]["control_mi"]) for n in names]
        if show_control and any(c != 0.0 for c in controls):
            any_control = True
            ax.plot(controls, ys, linestyle="none", marker="|", markersize=10, color="black")
    if any_control:
        ax.plot([], [], linestyle="none", marker="|", markersize=10, color="black", label="shuffled control")
    ax.set_yticks(list(range(len(order))))
    ax.set_yticklabels(list(reversed(order)), fontsize=7)
    ax.set_xlabel("I(a; â), nats")
    ax.set_xlim(left=0.0)
    if title:
        ax.set_title(title, fontsize=9)
    if len(tables) > 1 or any_control:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def table_json(table: Any) -> dict[str, Any]:
    """An ``ImportanceTable`` message as JSON-ready data (models, parameters, rows)."""
    return {
        "fr_model": {"name": table.fr_model.name, "version": table.fr_model.version, "alias": table.fr_model.alias},
        "decoder": {"name": table.decoder.name, "version": table.decoder.version, "alias": table.decoder.alias},
        "estimator": table.estimator,
        "seed": int(table.seed),
        "n_items": int(table.n_items),
        "n_bootstrap": int(table.n_bootstrap),
        "ci_level": float(table.ci_level),
        "data_manifest_sha256": table.data_manifest_sha256,
        "mlflow_run_id": table.mlflow_run_id,
        "rows": [row_dict(r) for r in table.rows],
    }


def write_table_files(table: Any, folder: Path | str, title: str = "") -> list[Path]:
    """importance.csv, importance.json and importance.png of one table in ``folder``."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    paths = [write_csv(table.rows, root / "importance.csv")]
    (root / "importance.json").write_text(json.dumps(table_json(table), indent=2, allow_nan=True) + "\n")
    paths.append(root / "importance.json")
    label = f"{table.fr_model.name} v{table.fr_model.version}"
    paths.append(importance_chart([(label, list(table.rows))], root / "importance.png", title or label))
    return paths
