"""The settings file in words: every candidate's change under each judge, the committee's agreement, the
radius marks and the confirmation on the other half, as `cmboost tune` prints them."""

from __future__ import annotations

import json

from cmboost.boosting.settings import DO_NOT_BOOST


def _mark(settings: dict, method: str, best: dict) -> str:
    marks = []
    if method == settings.get("choice", settings["best"]):
        marks.append("chosen" if settings["best"] == method else "chosen, not confirmed")
    elif not best["recall_ok"]:
        marks.append("recall drops")
    if best.get("beyond_radius"):
        marks.append(f"{'eps' if 'eps' in best['hyper'] else 'edit'} beyond the robust radius {settings['robust_radius']}")
    return f" ({'; '.join(marks)})" if marks else ""


def _confirm_lines(settings: dict) -> list[str]:
    """Each method's best on the confirming half: the change of FID and KID per judge, +- its
    paired-bootstrap std, marked * beyond the noise (ERROR_BARS stds); then the answer and why."""
    decision = settings.get("decision")
    if decision is None:  # a file written before tune confirmed its choice
        return []
    names = [m["name"] for m in settings.get("committee", [settings["judge"]])]
    lines = [f"confirming half ({decision['halves']['confirm']}): change vs unboosted +- paired-bootstrap std "
             f"({decision['resamples']} resamples); * lowers it by more than {decision['error_bars']:g} std"]
    head = f"{'method':<9}"
    for i in range(1, len(names) + 1):
        head += f" {f'FID{i}':>16} {f'KID{i}':>16}"
    lines.append(head)

    def shown(change: dict) -> str:
        star = "*" if change["beyond_noise"] else " "
        spread = "n/a" if change["relative_std"] is None else f"{100 * change['relative_std']:.1f}"
        return f"{100 * change['relative']:+6.1f}+-{spread:>5}%{star}"

    for method, best in settings["methods"].items():
        if "confirm_change" in best:
            line = f"{method:<9}"
            for name in names:
                line += f" {shown(best['confirm_change'][name]['fid']):>16} {shown(best['confirm_change'][name]['kid']):>16}"
            lines.append(line)
    answer = "do not boost" if decision["best"] == DO_NOT_BOOST else f"boost with {decision['best']}"
    lines.append(f"answer: {answer}: {decision['reason']}")
    return lines


def _radius_lines(settings: dict) -> list[str]:
    """The candidates beyond the robust radius, if one was given."""
    if settings.get("robust_radius") is None:
        return []
    beyond = [c for c in settings["candidates"] if c.get("beyond_radius")]
    tuned = len(settings["candidates"]) - 1
    what = "marked, and may be chosen" if settings.get("allow_beyond_radius") else "marked, never chosen"
    listed = "; ".join(f"{c['method']} eps {c['hyper']['eps']:g} steps {c['hyper'].get('steps')}" if "eps" in c["hyper"]
                       else f"{c['method']} step {c['hyper'].get('step')} (mean L2 change {c['mean_l2_change']:.2f})"
                       for c in beyond)
    return [f"robust radius {settings['robust_radius']:g}: {len(beyond)} of {tuned} candidates edit beyond it "
            f"({what}){': ' + listed if listed else ''}"]


def format_table(settings: dict) -> str:
    """One line per method's best setting, then the unboosted row, under the tuning judge; with a
    committee, each judge's relative changes and the judges' ranking agreement."""
    if "committee" in settings:
        return _committee_table(settings)
    crit = settings["criterion"]
    what = f"lowest {crit.upper()}" if crit in ("fid", "kid") else "lowest worst relative change of FID and KID"
    lines = [f"tuning judge: {settings['judge']['name']} ({settings['judge']['identity']}); reference: "
             f"{settings['reference']['data']}; criterion: {what} with recall within "
             f"{settings['max_recall_drop']} of unboosted",
             f"{'method':<9} {'FID':>8} {'KID x1e3':>9} {'recall':>7} {'L2 change':>9}  settings"]
    base = settings["unboosted"]
    lines.append(f"{'none':<9} {base['fid']:8.3f} {1e3 * base['kid']:9.3f} {base['recall']:7.3f} {0.0:9.3f}")
    for method, best in settings["methods"].items():
        m = best["metrics"]
        lines.append(f"{method:<9} {m['fid']:8.3f} {1e3 * m['kid']:9.3f} {m['recall']:7.3f} "
                     f"{best['mean_l2_change']:9.3f}  {json.dumps(best['hyper'], sort_keys=True)}"
                     f"{_mark(settings, method, best)}")
    return "\n".join(lines + _radius_lines(settings) + _confirm_lines(settings))


def _committee_table(settings: dict) -> str:
    members = settings["committee"]
    names = [m["name"] for m in members]
    base = settings["candidates"][0]["judges"]
    lines = [f"tuning committee of {len(names)} judges; choice: {settings['rule']} "
             f"({settings['max_recall_drop']})"]
    for i, member in enumerate(members, 1):
        b = base[member["name"]]
        lines.append(f"  [{i}] {member['name']} ({member['identity']}), reference {member['reference']['data']}: "
                     f"unboosted FID {b['fid']:.3f}, KID x1e3 {1e3 * b['kid']:.3f}, recall {b['recall']:.3f}")
    head = f"{'method':<9} {'worst':>7}"
    for i in range(1, len(names) + 1):
        head += f" {f'FID{i}':>7} {f'KID{i}':>7} {f'rec{i}':>6}"
    lines.append(head + f" {'L2 change':>9}  settings   (FID, KID: change vs unboosted in %)")
    for method, best in settings["methods"].items():
        line = f"{method:<9} {100 * best['worst']:6.1f}%"
        for name in names:
            change, recall = best["change"][name], best["judges"][name]["recall"]
            line += f" {100 * change['fid']:7.1f} {100 * change['kid']:7.1f} {recall:6.3f}"
        lines.append(line + f" {best['mean_l2_change']:9.3f}  {json.dumps(best['hyper'], sort_keys=True)}"
                            f"{_mark(settings, method, best)}")
    agreement = settings["agreement"]
    shown = lambda rho: "n/a" if rho is None else f"{rho:.3f}"  # noqa: E731
    lines.append(f"ranking agreement on the validation samples (Spearman rho of the {agreement['candidates']} "
                 f"candidates' FID):")
    for pair in agreement["pairs"]:
        a, b = (names.index(n) + 1 for n in pair["judges"])
        lines.append(f"  [{a}] vs [{b}]: {shown(pair['rho'])}")
    lines.append("  each judge against the others (mean): " +
                 ", ".join(f"[{i}] {shown(agreement['mean'][n])}" for i, n in enumerate(names, 1)))
    return "\n".join(lines + _radius_lines(settings) + _confirm_lines(settings))
