"""Prints the README's results tables from a demo report (recipes/fmnist-report/report.json).

    .venv/bin/python scripts/readme_results.py recipes/fmnist-report/report.json
"""

import json
import sys

from cmboost.demo.report import _judge_check_section, paired_table, panel_sentence

from cmboost.demo.verdicts import generator_bar
from cmboost.files.report import markdown_table


def main(path: str) -> None:
    report = json.loads(open(path).read())
    judges = list(report["reporting_judges"])
    print("\n".join(_judge_check_section(report)[2:]))
    print(paired_table(report) + "\n")
    for v in report["panel_verdicts"]:
        print(f"- {panel_sentence(v)}")
    print()
    rows = []
    for s in report["summary"]:
        row = {"generator": s["generator"], "boost": s["boost"], "L2 change": f"{s['mean_l2_change']:.2f}"}
        for j in judges:
            m = s["judges"][j]
            row[f"FID ({j})"] = f"{m['fid_mean']:.1f} ± {m['fid_std']:.1f}"
            row[f"KID×1e3 ({j})"] = f"{1e3 * m['kid_mean']:.0f} ± {1e3 * m['kid_std']:.0f}"
            row[f"recall ({j})"] = f"{m['recall_mean']:.3f}"
        rows.append(row)
    columns = ["generator", "boost"] + [f"{k} ({j})" for j in judges for k in ("FID", "KID×1e3", "recall")]
    print(markdown_table(rows, columns + ["L2 change"]))
    print()
    verdicts = [{"generator": v["generator"], "method": v["method"], "judge": v["judge"],
                 "FID change": f"{-100 * v['fid_cut']:+.0f}%", "KID change": f"{-100 * v['kid_cut']:+.0f}%",
                 **{k: "yes" if ok else "no" for k, ok in v["checks"].items()}} for v in report["verdicts"]]
    print(markdown_table(verdicts, list(verdicts[0])))
    print()
    print(markdown_table(generator_bar(report), ["generator", "judge", "FID", "blur FID", "reaches the bar"]))


if __name__ == "__main__":
    main(sys.argv[1])
