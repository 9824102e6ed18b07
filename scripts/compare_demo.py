"""Compares two `cmboost demo` runs number for number: report.json (timings and output paths masked),
report.md, and optionally the two runs' printed output. A refactor must leave every number the
demo prints unchanged on the same machine.

    python scripts/compare_demo.py [--added-field NAME ...] BEFORE_OUT_DIR AFTER_OUT_DIR [BEFORE.log AFTER.log]

--added-field NAME: a field the newer report adds (as the methods' "key" once was), left out of the
AFTER report before comparing; every number must still match.
"""

import json
import re
import sys

PATH = re.compile(r"\S*/(?=(fid-vs-nfe\.png|grid-c[td]1\.png))")  # an output file's folder
TIMING = [(re.compile(r"\(\d+(\.\d+)? s\)"), "(X s)"), (re.compile(r"Ran in \d+(\.\d+)? s"), "Ran in X s")]


def masked_text(text: str) -> str:
    text = PATH.sub("OUT/", text)
    for pattern, fill in TIMING:
        text = pattern.sub(fill, text)
    return text


def masked_report(value, drop: tuple = ()):
    if isinstance(value, dict):
        return {k: masked_report(v, drop) for k, v in value.items() if k != "seconds" and k not in drop}
    if isinstance(value, list):
        return [masked_report(v, drop) for v in value]
    return PATH.sub("OUT/", value) if isinstance(value, str) else value


def main(argv: list[str]) -> int:
    added = []
    while len(argv) >= 2 and argv[0] == "--added-field":
        added.append(argv[1])
        argv = argv[2:]
    if len(argv) not in (2, 4):
        print("usage: python scripts/compare_demo.py [--added-field NAME ...] BEFORE_OUT_DIR AFTER_OUT_DIR "
              "[BEFORE.log AFTER.log]", file=sys.stderr)
        return 2
    before, after = argv[:2]
    reports = [masked_report(json.load(open(f"{before}/report.json"))),
               masked_report(json.load(open(f"{after}/report.json")), tuple(added))]
    same = {"report.json": reports[0] == reports[1]}
    differing = [k for k in reports[0] if reports[0][k] != reports[1].get(k)]
    same["report.md"] = masked_text(open(f"{before}/report.md").read()) == masked_text(open(f"{after}/report.md").read())
    if len(argv) == 4:
        same["printed output"] = masked_text(open(argv[2]).read()) == masked_text(open(argv[3]).read())
    for what, equal in same.items():
        print(f"{what}: {'identical' if equal else 'DIFFERENT'}")
    if differing:
        print("report.json keys that differ: " + ", ".join(differing))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
