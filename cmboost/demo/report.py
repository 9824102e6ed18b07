"""The demo's numbers in words: mean +- std over seeds, verdicts against the targets, and markdown."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cmboost.demo.plan import method_key
from cmboost.demo.verdicts import RECALL_SLACK, generator_bar, miss_causes
from cmboost.files.report import DIFFERENCE_GAIN, line_plot, markdown_table
from cmboost.tuning.candidates import ERROR_BARS

FRONTIER_ROUTES = ("generator steps", "1 step + joint PGD")


def paired_table(report: dict) -> str:
    """The paired changes behind the panel's verdict, in percent of the unboosted mean."""
    votes = {(v["generator"], v["method"], judge): vote for v in report["panel_verdicts"]
             for judge, vote in v["votes"].items()}

    def pct(change: dict, base: float) -> str:
        return f"{100 * change['change'] / base:+.1f}% ± {100 * change['std'] / base:.1f}"

    rows = [{"generator": p["generator"], "method": p["method"], "judge": p["judge"],
             "FID change": pct(p["fid"], p["fid"]["base"]), "KID change": pct(p["kid"], p["kid"]["base"]),
             "FID vs plain control": "–" if p["vs_plain"] is None else pct(p["vs_plain"]["fid"], p["fid"]["base"]),
             "KID vs plain control": "–" if p["vs_plain"] is None else pct(p["vs_plain"]["kid"], p["kid"]["base"]),
             "vote": votes[p["generator"], p["method"], p["judge"]]} for p in report["paired"]]
    return markdown_table(rows, list(rows[0])) if rows else ""


def panel_sentence(v: dict) -> str:
    others = v["judges"] - v["for"] - v["against"]
    if v["for"] == v["judges"]:
        word = "helps"
    elif v["against"] == v["judges"]:
        word = "hurts"
    elif v["for"] > 0 and v["against"] == 0:
        word = "helps under some judges and is undecided under the rest"
    elif v["against"] > 0 and v["for"] == 0:
        word = "hurts under some judges and is undecided under the rest"
    elif v["for"] and v["against"]:
        word = "is judged in both directions: no verdict"
    else:
        word = "makes no difference beyond the error bars"
    return (f"{v['method']} on {v['generator']} {word}: {v['for']} of {v['judges']} panel judges for, "
            f"{v['against']} against, {others} neither.")


def _pm(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def committee_agreement(agreement: dict) -> list[str]:
    """One line per tuned generator: how alike the tuning committee ranked the candidates (Spearman's rho
    of their FIDs on the validation samples, per pair of judges)."""
    lines = []
    for gen, a in agreement.items():
        pairs = "; ".join(f"{' vs '.join(p['judges'])} {'-' if p['rho'] is None else format(p['rho'], '.2f')}"
                          for p in a["pairs"])
        lines.append(f"  - {gen}: rank agreement of the {a['candidates']} candidates' validation FIDs "
                     f"(Spearman rho): {pairs}")
    return lines


def _route(label: str) -> bool:
    return label.startswith("one more generator step")


def _gain_map_section(report: dict) -> list[str]:
    """Where boosting pays, from the shipped summary of the recipe's gain map (the demo does not run it)."""
    g = report.get("gain_map")
    head = "## Where boosting pays: the recipe's gain map (not run by the demo)\n"
    if not g:
        return [head, "No gain map was shipped (recipes/fmnist.sh, stage gain-map).\n"]
    panel = g["panel"]
    fid, fid_std = g["edit_columns"].index("fid_relative"), g["edit_columns"].index("fid_relative_std")

    def shown(cells: list[float]) -> str:
        return f"{100 * cells[fid]:+.1f} ± {100 * cells[fid_std]:.1f}%"

    rows = []
    for gen in g["generators"]:
        edits = {label: e for label, e in gen["edits"].items() if not _route(label) and
                 not label.startswith(("unsharp", "BIGRoC"))}
        best = min(edits, key=lambda label: sum(edits[label][j][fid] for j in panel))
        route = next(label for label in gen["edits"] if _route(label))
        row = {"generator": gen["generator"], "booster AUC": f"{gen['realness_auc']:.2f}", "tune's answer": gen["tune"],
               "best boost (panel mean)": best}
        for j in panel:
            row[f"{j}: FID, best boost, one more step"] = (f"{gen['base_fid'][j]:.1f}; {shown(edits[best][j])}; "
                                                            f"{shown(gen['edits'][route][j])}")
        rows.append(row)
    lines = [head, f"`recipes/gain_map.py` (its summary ships as `cmboost/assets/fmnist/gain-map.json`): "
                   f"{g['num']} images per generator, booster `{g['booster']}`, the booster's realness AUC on "
                   f"each generator, tune's answer, and the relative FID change of the best boosting edit and of "
                   f"one more generator step under each panel judge, ± paired-bootstrap std ({g['bootstrap']} "
                   "resamples).\n", markdown_table(rows, list(rows[0])), ""]
    judged = [(gen["generator"], label, verdict, gen["edits"][label]) for gen in g["generators"]
              for label, verdict in gen["rule"].items()]
    met = [(gen, label) for gen, label, verdict, _ in judged if verdict["met"]]
    lines.append(f"Boosters built to win on the shipped 1-step generators, the levers of `recipes/README.md` "
                 f"among them, judged by its rule ({g['rule']}): **{len(met)} of {len(judged)} edits meet it**"
                 + (": " + "; ".join(f"{label} on {gen}" for gen, label in met) if met else "") + ".\n")
    table = [{"generator": gen, "edit": label, **{f"{j} FID": shown(cells[j]) for j in panel},
              "judges for / against": f"{len(verdict['judges_for'])} / {len(verdict['judges_against'])}"}
             for gen, label, verdict, cells in judged]
    if table:
        lines += [markdown_table(table, list(table[0])), ""]
    return lines


def render_markdown(report: dict) -> str:
    judges = list(report["reporting_judges"])
    parts = [f"# cmboost demo: Fashion-MNIST ({report['mode']}, {report['num_samples']} samples per row, "
             f"{report['seeds']} sample seeds for the headline rows)\n",
             f"Reference: {report['reference']}.\n",
             "## Judges\n",
             f"- **Tuning judge{'s' if len(report['tuning_judge']['names']) > 1 else ''}** (chose every "
             "boosting setting; not used below): "
             f"{', '.join(report['tuning_judge']['names'])} — {report['tuning_judge']['family']}; "
             f"{report['tuning_judge']['how']}.",
             *committee_agreement(report["tuning_judge"].get("agreement", {})),
             *[f"- **Reporting judge** `{n}`: {j['family']} (`{j['identity']}`)."
               for n, j in report["reporting_judges"].items()],
             f"- **Boosting network**: `{report['booster']}`, "
             + report["booster_choice"] + ".",
             "",
             *_judge_check_section(report),
             *_answer_section(report),
             "## Bars: real images\n",
             markdown_table([{"images": name, **{f"{j} FID": r["judges"][j]["fid"] for j in judges},
                              **{f"{j} KID×1e3": _pm(r["judges"][j]["kid"], r["judges"][j]["kid_std"], 1e3)
                                 for j in judges},
                              **{f"{j} IS": _is_text(r["judges"][j]) for j in judges}}
                             for name, r in report["bars"].items()],
                            ["images"] + [f"{j} FID" for j in judges] + [f"{j} KID×1e3" for j in judges]
                            + [f"{j} IS" for j in judges], "{:.2f}"),
             "",
             f"## Table 1: boosting 1-step samples (mean ± std over {report['seeds']} seeds)\n"]
    rows = []
    for s in report["summary"]:
        row = {"generator": s["generator"], "boost": s["boost"], "L2 change": f"{s['mean_l2_change']:.2f}"}
        for j in judges:
            m = s["judges"][j]
            row[f"{j} FID"] = _pm(m["fid_mean"], m["fid_std"])
            row[f"{j} KID×1e3"] = _pm(m["kid_mean"], m["kid_std"], 1e3)
            row[f"{j} IS"] = _pm(m["is_mean"], m["is_std"]) if "is_mean" in m else "–"
            row[f"{j} P / R"] = f"{m['precision_mean']:.2f} / {m['recall_mean']:.2f}"
        rows.append(row)
    columns = ["generator", "boost"] + [f"{j} {k}" for j in judges for k in ("FID", "KID×1e3", "IS", "P / R")] + \
        ["L2 change"]
    parts += [markdown_table(rows, columns), "",
              "L2 change: mean per-image L2 norm of the edit, images in [0, 1]. The random control moves each "
              "image along a random direction by the L2 norm of its joint-PGD edit; the plain-classifier control "
              "moves it by the same norm along the class evidence of the attacker (L2 PGD on its log p(y|x)). In the one-seed tables below, "
              "KID's ± is its standard deviation over 100 random subsets.\n",
              "## Against the targets\n",
              "Target: under every panel judge, FID and KID lowered by ≥ 25%, beating BIGRoC and every control "
              "beyond the error bars (mean + std below the rival's mean − std, for FID and KID), recall within "
              f"{RECALL_SLACK:g}.\n"]
    vrows = [{"generator": v["generator"], "method": v["method"], "judge": v["judge"],
              "FID change": f"{-100 * v['fid_cut']:+.1f}%", "KID change": f"{-100 * v['kid_cut']:+.1f}%",
              **{k: "yes" if ok else "**no**" for k, ok in v["checks"].items()}} for v in report["verdicts"]]
    if vrows:
        parts.append(markdown_table(vrows, list(vrows[0])))
    parts += ["", "## The panel's verdict\n",
              "Each change is a paired difference: the same images before and after the edit (and after the "
              "plain-classifier control's edit of them), with its paired-bootstrap std "
              f"({report['paired_resamples']} resamplings of the images, the same for both sets), pooled over "
              f"the {report['seeds']} seeds, in percent of the unboosted mean. A panel judge is *for* a method "
              f"when FID and KID fall by more than {ERROR_BARS:g} stds and the method also beats the "
              f"plain-classifier control by as much; *against* when both rise by more than {ERROR_BARS:g} stds.\n",
              paired_table(report), "",
              *[f"- {panel_sentence(v)}" for v in report["panel_verdicts"]], "",
              *answers_beside_verdict(report)]
    met = [v for v in report["verdicts"] if v["met"]]
    parts += ["", f"**{len(met)} of {len(report['verdicts'])} (generator, method, judge) combinations meet every "
              "target.** " + " ".join(_misses(report["verdicts"])), ""]
    if len(met) < len(report["verdicts"]):
        parts += ["What the misses come from, as measured:\n", *[f"{i}. {c}" for i, c in
                                                              enumerate(miss_causes(report), 1)], ""]
    parts += _diagnostic_section(report)
    parts += _gain_map_section(report)
    parts += ["## Generators against the blur bar\n",
              "Target: unboosted 1-step samples at least as good as real held-out images blurred with sigma 1.\n",
              *[f"- {name}: {text}" for name, text in report.get("generators", {}).items()], "",
              markdown_table(generator_bar(report), ["generator", "judge", "FID", "blur FID", "KID×1e3",
                                                     "blur KID×1e3", "reaches the bar"]), ""]
    parts += ["## 2-step generators (one seed)\n", _judge_table(report["two_step"], ["generator", "boost"], judges), "",
              "## Table 2: training objective of the joint network (PGD, one seed)\n",
              _judge_table(report["objectives"], ["generator", "objective"], judges), "",
              "## Compute frontier\n",
              "FID against operations per image: more generator steps, or one step plus k steps of the "
              "tuned joint-network PGD run (its step size, stopped after k steps). A generator step is one "
              "forward pass of the UNet; a boosting step is a forward and backward pass of the much smaller "
              "joint network" + _flops_sentence(report) + ".\n",
              _judge_table([dict(p, generator=g) for g, pts in report["frontier"].items() for p in pts],
                           ["generator", "route", "nfe"] + (["gflops"] if "flops_per_image" in report else []),
                           judges),
              f"\n![FID vs operations per image](fid-vs-nfe.png)\n",
              "## Grids\n",
              *[f"![{g} before/after](grid-{g}.png)" for g in report["grids"]],
              "\nLeft: samples, 8 per class; middle: the same after joint-network PGD; right: what the edit "
              f"changed, |after − before| × {DIFFERENCE_GAIN} (black: unchanged).\n",
              f"Tuned settings: `{json.dumps(report['tuned'])}`\n",
              f"Ran in {report['seconds']} s.\n"]
    return "\n".join(parts)


def _answer_section(report: dict) -> list[str]:
    """Per generator, the tuning committee's answer to "should I boost?" (its confirming half)."""
    answers = report.get("answers")
    if not answers:
        return []
    lines = ["## Should you boost? The tuning committee's answer per generator\n",
             "`cmboost tune` chose on half of the validation samples and kept a choice only if, on the other "
             f"half, it lowered FID and KID under every tuning judge by more than {ERROR_BARS:g} paired-bootstrap stds "
             "(judges and samples that take no part in the report below).\n"]
    for generator, answer in answers.items():
        if answer["best"] == "none":
            lines.append(f"- **{generator}**: tuning found no setting that helps. {answer['reason']}.")
            continue
        changes = "; ".join(f"{name} FID {100 * c['fid']['relative']:+.1f}% ± {100 * c['fid']['relative_std']:.1f}%, "
                            f"KID {100 * c['kid']['relative']:+.1f}% ± {100 * c['kid']['relative_std']:.1f}%"
                            for name, c in answer["judges"].items())
        lines.append(f"- **{generator}**: boost with {answer['best']}; confirmed change {changes}." if changes else
                     f"- **{generator}**: {answer['best']} ({answer['reason']}).")
    return lines + [""]


def answers_beside_verdict(report: dict) -> list[str]:
    """Per headline generator, the tuning committee's answer next to what the panel says of it."""
    votes = {(v["generator"], method_key(v)): v for v in report["panel_verdicts"]}
    lines = []
    for generator, answer in (report.get("answers") or {}).items():
        if answer["best"] == "none":
            panel = [v for (g, _), v in votes.items() if g == generator]
            seen = "; ".join(f"{v['method']} {v['for']} for, {v['against']} against" for v in panel)
            lines.append(f"- {generator}: tuning found no setting that helps" + (f"; the panel: {seen}." if seen else "."))
        elif (generator, answer["best"]) in votes:  # the tune file's methods are the demo's keys
            v = votes[generator, answer["best"]]
            lines.append(f"- {generator}: tuning says boost with {answer['best']}; the panel: {v['for']} of "
                         f"{v['judges']} judges for it, {v['against']} against.")
    return (["Tuning's answer beside the panel's (the tuning judges chose; the panel did not):\n", *lines, ""]
            if lines else [])


def _judge_check_section(report: dict) -> list[str]:
    check = report["judge_check"]
    rows = []
    for name, r in check["judges"].items():
        if "unavailable" in r:
            rows.append({"judge": name, "clean FID": "-", "ladders": "-", "worst edit": "-", "adv/random": "-",
                         "verdict": "unavailable here"})
            continue
        worst = min(r["edits"], key=lambda e: e["relative_fid_change"])
        ratio = (f"{worst['fid_change'] / worst['random_fid_change']:.2f}" if worst["random_fid_change"] else "-")
        rows.append({"judge": name, "clean FID": f"{r['clean_fid']:.2f}",
                     "ladders": "monotonic" if r["ladder_monotonic"] else "**broken**",
                     "worst edit": f"{100 * worst['relative_fid_change']:+.1f}% (eps {worst['eps']:g}"
                                   + ("" if worst["bootstrap_std"] is None else f", ± {worst['bootstrap_std']:.2f}")
                                   + ")", "adv/random": ratio,
                     "verdict": ("passes, in the panel" if r["in_panel"] else
                                 "passes, tunes (committee)" if r["passed"] and r.get("on_committee") else
                                 "passes" if r["passed"] else "**fails**: " + "; ".join(r["reasons"])
                                 + (" (yet tuned: chose the settings)" if r.get("on_committee") else ""))})
    data = check["data"]
    return ["## Which judges may report\n",
            f"Every candidate ran `cmboost check-judges` (against {data.get('real', 'the test split')}: "
            f"{data['reference']} images for the reference, {data['probe']} for each rung): a degradation ladder "
            "(blur, noise, JPEG, mixed-in generated images) that it must rank monotonically, and edits of "
            f"generated images that raise the class evidence of `{check['attacker']['name']}`, a plain classifier "
            "unrelated to every judge and to the booster, that it must not reward beyond its error bar "
            "(2 paired-bootstrap stds). adv/random: the FID change of the worst adversarial edit over that of "
            "a random edit of the same norm. The panel is the reporting candidates that passed; the tuning "
            "judges and the attacker never report, and a tuning judge sits on the committee only once it "
            "passes too.\n",
            markdown_table(rows, ["judge", "clean FID", "ladders", "worst edit", "adv/random", "verdict"]),
            f"\n**Panel:** {', '.join(f'`{n}`' for n in check['panel'])}.\n"]


def _diagnostic_section(report: dict) -> list[str]:
    """The booster's judge-free diagnostic (`cmboost diagnose`, shipped beside the booster)."""
    d = report.get("diagnostic")
    head = f"## The booster's diagnostic (`{report['booster']}`, no judge involved)\n"
    if not d:
        return [head, "No diagnostic was shipped for this network (recipes/fmnist.sh, stage diagnose).\n"]
    acc = d["accuracy"]
    robust = ", ".join(f"{r['accuracy']:.1%} at eps {r['eps']:g}" for r in acc["robust"])
    lines = [head, f"On {d['num_real']} held-out real images: clean accuracy {acc['clean']:.1%}; L2-PGD robust "
                   f"accuracy ({acc['attack']['steps']} steps) {robust}."
                   + (f" Its default boosting radius is eps {report['booster_radius']:g}, the radius it was "
                      "adversarially trained at." if report.get("booster_radius") is not None else "") + "\n"]
    rows = []
    for name, g in d["realness"]["generators"].items():
        rows.append({"samples": name, "method": g["method"], "L2 change": f"{g['mean_l2_change']:.2f}",
                     "realness AUC before": f"{g['before']['auc']:.3f}", "after": f"{g['after']['auc']:.3f}",
                     "mean p(y|x) before": f"{g['before']['mean_p_y']:.2f}", "after ": f"{g['after']['mean_p_y']:.2f}"})
    if rows:
        lines += [f"Realness AUC, real images against the samples (1: the network tells them apart; 0.5: it "
                  f"cannot), before and after boosting; mean p(y|x) of real images "
                  f"{d['realness']['real']['mean_p_y']:.2f}.\n", markdown_table(rows, list(rows[0])), ""]
    if d.get("alignment"):
        a = d["alignment"]
        cells = [f"{r['mean']:.3f} at sigma {r['sigma']:g}" for r in a["real"] if r["mean"] is not None]
        lines.append("Alignment of grad_x log p(y|x) with the EDM teacher's class-conditional score (cosine, "
                     f"real images): {', '.join(cells)}.\n")
    else:
        lines.append("Gradient-score alignment: not measured (no EDM teacher was given).\n")
    pag = d["pag"]
    lines.append(f"Targeted L2 PGD (eps {pag['eps']:g}, {pag['steps']} steps) toward every class reaches a mean "
                 f"target probability of {pag['mean_target_prob_grey']:.2f} from grey"
                 + (f" and {pag['mean_target_prob_real']:.2f} from real images" if pag["mean_target_prob_real"]
                    is not None else "") + f" (the picture: `cmboost/assets/fmnist/diagnose-{report['booster']}.png`).\n")
    return lines


def _is_text(metrics: dict) -> str:
    return "–" if metrics.get("is") is None else f"{metrics['is']:.2f}"


def _judge_table(rows: list[dict], keys: list[str], judges: list[str]) -> str:
    """One-seed rows: each judge's FID, KID (± over its subsets), IS, precision / recall."""
    flat = [{**{k: r[k] for k in keys}, **{f"{j} FID": r["judges"][j]["fid"] for j in judges},
             **{f"{j} KID×1e3": _pm(r["judges"][j]["kid"], r["judges"][j]["kid_std"], 1e3) for j in judges},
             **{f"{j} IS": _is_text(r["judges"][j]) for j in judges},
             **{f"{j} P / R": f"{r['judges'][j]['precision']:.2f} / {r['judges'][j]['recall']:.2f}" for j in judges},
             "L2 change": r["mean_l2_change"]} for r in rows]
    return markdown_table(flat, keys + [f"{j} {m}" for j in judges for m in ("FID", "KID×1e3", "IS", "P / R")]
                          + ["L2 change"], "{:.2f}")


def _misses(found: list[dict]) -> list[str]:
    """Plain sentences for the targets missed, grouped by check."""
    missed: dict[str, list[str]] = {}
    for v in found:
        for check, ok in v["checks"].items():
            if not ok:
                missed.setdefault(check, []).append(f"{v['method']} on {v['generator']} under {v['judge']}")
    return [f"Missed '{check}': {'; '.join(where)}." for check, where in missed.items()]


def _flops_sentence(report: dict) -> str:
    flops = report.get("flops_per_image")
    if not flops:
        return ""
    return (f" ({flops['generator_step'] / 1e6:.0f} and {flops['booster_step'] / 1e6:.0f} MFLOPs per image, "
            "counted by torch's FlopCounterMode: convolutions and matrix products)")


def frontier_series(frontier: dict[str, list[dict]], judge: str) -> dict[str, list[tuple[float, float]]]:
    """One (cost, FID) line per generator and route, the cost being GFLOPs per image where the report
    has them (else network evaluations). The boosting route starts from the 1-step sample it boosts,
    so both routes leave from the same point."""
    cost = "gflops" if all("gflops" in p for points in frontier.values() for p in points) else "nfe"
    series = {}
    for name, points in frontier.items():
        start = next(p for p in points if p["route"] == FRONTIER_ROUTES[0] and p["nfe"] == 1)
        for route in FRONTIER_ROUTES:
            pts = [(p[cost], p["judges"][judge]["fid"]) for p in points if p["route"] == route]
            if route == FRONTIER_ROUTES[1]:
                pts = [(start[cost], start["judges"][judge]["fid"])] + pts
            series[f"{name}: {route}"] = pts
    return series


def plot_frontier(frontier: dict[str, list[dict]], judge: str, path: str | os.PathLike,
                  overwrite: bool = False) -> Path:
    """The compute-frontier figure: FID under `judge` against operations (else network evaluations) per image."""
    flops = all("gflops" in p for points in frontier.values() for p in points)
    what = "GFLOPs per image" if flops else "network evaluations per image"
    return line_plot(frontier_series(frontier, judge), path, f"FID ({judge}) vs {what}",
                     f"{what} (log scale)", f"FID ({judge})", logx=True, overwrite=overwrite)
