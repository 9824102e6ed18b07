"""A tune job's cached rows (one per candidate, scored on both halves), schema-checked when a run resumes,
each problem named with its fix."""

from __future__ import annotations

from cmboost.boosting.config import json_kind, json_text
from cmboost.errors import UserInputError
from cmboost.jobs.job import ROWS_FILE, Job

METRIC_KEYS = ("fid", "kid", "kid_std", "is", "precision", "recall")  # what a row keeps of each judge


def finished_rows(job: Job, keys: list[str], names: list[str] | None = None) -> dict[str, dict]:
    """The job's finished rows among `keys`, schema-checked: a row of another shape is named with its
    fix, never half-read. `names`: a committee's judges, whose metrics each row must hold."""
    where = job.folder / ROWS_FILE
    fresh = f"delete {job.folder} to start over"
    done = {}
    for key in keys:
        if key in job.rows:
            check_row(job.rows[key], f"{where}: {json_text(key)}", fresh, names)
            done[key] = job.rows[key]
    return done


def check_metrics(metrics, where: str, fresh: str) -> None:
    def number(value, nullable=False) -> bool:
        return (value is None and nullable) or (isinstance(value, (int, float)) and not isinstance(value, bool))

    if not isinstance(metrics, dict) or not all(number(metrics.get(k), k not in ("fid", "recall")) for k in METRIC_KEYS):
        raise UserInputError(f"{where}: expected numbers for {', '.join(METRIC_KEYS)}; {fresh}")


def check_half(half: dict, where: str, fresh: str, names: list[str] | None) -> None:
    """One half's scores in a row: its lead judge's metrics, and with a committee each judge's."""
    check_metrics(half.get("metrics"), f"{where}: metrics", fresh)
    if names is not None:
        per = half.get("judges")
        if not isinstance(per, dict) or set(per) != set(names):
            raise UserInputError(f"{where}: judges: expected the metrics of each of {', '.join(names)}; {fresh}")
        for name in names:
            check_metrics(per[name], f"{where}: judges[{json_text(name)}]", fresh)


def check_row(row, where: str, fresh: str, names: list[str] | None = None) -> None:
    if not isinstance(row, dict):
        raise UserInputError(f"{where}: expected an object, got {json_kind(row)}; {fresh}")
    if not isinstance(row.get("method"), str) or not isinstance(row.get("hyper"), dict):
        raise UserInputError(f"{where}: needs a method (string) and hyper (object); {fresh}")
    check_half(row, where, fresh, names)
    confirm = row.get("confirm")
    if not isinstance(confirm, dict):
        raise UserInputError(f"{where}: confirm: expected the confirming half's metrics; {fresh}")
    check_half(confirm, f"{where}: confirm", fresh, names)
    if not isinstance(row.get("mean_l2_change"), (int, float)) or isinstance(row.get("mean_l2_change"), bool):
        raise UserInputError(f"{where}: mean_l2_change: expected a number; {fresh}")
