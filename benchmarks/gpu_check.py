"""One GPU run: the environment, the CUDA tests, the four benchmarks and the Fashion-MNIST models at GPU
scale, in one command with one time budget (benchmarks/gpu_check.sh is the launcher; README beside it).

    bash benchmarks/gpu_check.sh --out "$OUT"        # on the GPU machine: about 9 minutes
    bash benchmarks/gpu_check.sh --smoke --out tmp   # every part at toy sizes on the CPU (tests/test_gpu_check.py)

Each part runs as a child process with its own share of --budget-s; time a part leaves unused passes to
the parts after it. A part that runs out of time is stopped (SIGTERM, then SIGKILL) and still reports:
the benchmarks rewrite their --json after every figure, the recipe keeps what its stages saved, and
pytest's per-test lines are read from its output. Everything goes to --out:

    gpu_check.json          every figure, every pass/fail, each part's status and seconds, the targets
    gpu_check.log           the output of every part, in order
    fmnist/*.safetensors    the trained checkpoints (EDM teacher, CT, CD, joint network), each < 16 MiB
    fmnist/training.json    the training logs and the FID check of the recipe

At most 8 files and no deeper than one folder, as the device tool returns them. Work files go to
--work-dir (default: a new folder under /tmp).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
PARTS = ("env", "tests", "boost", "train_jcd", "sample", "features", "fmnist")
# Seconds of a 540 s budget per part. The shares are fractions of --budget-s; unused time flows onward.
# env's share covers a cold `import torch` on a fresh machine and the two ceiling measurements.
SHARES = {"env": 25, "tests": 100, "boost": 80, "train_jcd": 40, "sample": 45, "features": 40, "fmnist": 210}
RESERVE_S = 8            # kept back at the end for the summary and the copies
TERM_GRACE_S = 8         # between SIGTERM and SIGKILL when a part runs out of time
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20   # what the device tool brings back
TARGETS = {  # issue 22's targets for the real run: reported, never asserted
    "boost": ("boost, WRN-50-2 64x64 15 steps: ours / released loop", 13.0),
    "train_jcd": ("train-jcd iteration, WRN-50-2 128+128: ours / released", 4.0),
    "sample": ("1-step ImageNet-64 sampling: best bf16 path / openai-style fp32 loop", 2.0),
    "features": ("Inception features: ours / torch-fidelity", 2.0),
    "features_fid": ("Inception FID: |ours - torch-fidelity| at most", 0.01),
}


# ----------------------------------------------------------------------------- running one part

class Part:
    """A child process whose output goes to the console and to the combined log, stopped at a deadline."""

    def __init__(self, name: str, log, lock: threading.Lock, prefix_log: bool = False, tail_lines: int = 400):
        self.name, self.log, self.lock, self.prefix_log = name, log, lock, prefix_log
        self.lines: list[str] = []
        self.tail_lines = tail_lines

    def _pump(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if len(self.lines) > self.tail_lines:
                del self.lines[: len(self.lines) - self.tail_lines]
            text = f"[{self.name}] {line}\n"
            with self.lock:
                sys.stdout.write(text)
                sys.stdout.flush()
                self.log.write(text if self.prefix_log else line + "\n")
                self.log.flush()

    def run(self, cmd: list[str], timeout: float, env: dict, cwd: Path = ROOT) -> tuple[int | None, bool, float]:
        """(returncode, timed_out, seconds). The child gets its own process group, so that grandchildren
        (torchrun workers, the recipe's commands) stop with it."""
        with self.lock:
            self.log.write(f"{f'[{self.name}] ' if self.prefix_log else ''}$ {shlex.join(cmd)}\n")
            self.log.flush()
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        pump = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        pump.start()
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
        except KeyboardInterrupt:
            self._signal(proc, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            self._signal(proc, signal.SIGKILL, group_only=True)  # leftovers of the group
        pump.join(timeout=5)
        return proc.returncode, timed_out, time.monotonic() - start

    @staticmethod
    def _signal(proc, sig, group_only: bool = False) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            if not group_only and proc.poll() is None:
                proc.send_signal(sig)


# ----------------------------------------------------------------------------- the check

class Check:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.device = args.device or ("cpu" if args.smoke else "cuda")
        self.out = Path(args.out).resolve()
        self.work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.remove_work = not args.work_dir and not args.keep_work
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.parts = [p for p in PARTS if p in set(args.parts.split(","))] if args.parts else list(PARTS)
        unknown = set(args.parts.split(",")) - set(PARTS) if args.parts else set()
        if unknown:
            raise SystemExit(f"gpu_check: --parts: unknown {', '.join(sorted(unknown))} (choose from {', '.join(PARTS)})")
        self.data_dir = self._data_dir(args.data_dir)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s - RESERVE_S
        total_share = sum(SHARES[p] for p in self.parts)
        self.share = {p: SHARES[p] / total_share * (args.budget_s - RESERVE_S) for p in self.parts}
        self.log = open(self.out / "gpu_check.log", "w")
        self.lock = threading.Lock()
        # --smoke: the recipe runs beside the other parts (a 2-core CPU is otherwise half idle while
        # processes start); on the GPU every part runs alone, so that no figure is measured under load.
        self.parallel = self.smoke and "fmnist" in self.parts and len(self.parts) > 1
        self.result = {
            "version": 1, "mode": "smoke" if self.smoke else "gpu", "device": self.device,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": args.budget_s,
            "command": shlex.join([sys.argv[0], *sys.argv[1:]]), "commit": commit(),
            "data_dir": str(self.data_dir) if self.data_dir else None,
            "wheels": os.environ.get("GPU_CHECK_WHEELS", ""),
            "parts": {p: {"status": "not run", "seconds": 0.0, "budget_s": round(self.share[p], 1)} for p in self.parts},
        }
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(BENCH), os.environ.get("PYTHONPATH")]))
        self.env.setdefault("TQDM_DISABLE", "1")
        self.env["PYTHONUNBUFFERED"] = "1"
        if self.data_dir:
            self.env["CMBOOST_FMNIST_DIR"] = str(self.data_dir)
        if self.smoke:
            self.env.setdefault("OMP_NUM_THREADS", "1")  # two parts share the two cores
        self.py = sys.executable

    @staticmethod
    def _data_dir(given: str | None) -> Path | None:
        for candidate in ([given] if given else []) + [str(ROOT / ".gpu-carry" / "fashion-mnist")]:
            if candidate and Path(candidate, "train-images-idx3-ubyte.gz").is_file():
                return Path(candidate).resolve()
        if given:
            raise SystemExit(f"gpu_check: --data-dir {given}: no train-images-idx3-ubyte.gz there")
        return None  # cmboost's own search: $CMBOOST_FMNIST_DIR, then the system copy

    # -- time
    def budget_for(self, part: str) -> float:
        """This part's share plus what earlier parts left, less what the later parts are owed (side by side,
        in --smoke: the time left, as a guard against hangs)."""
        if self.parallel:
            return max(5.0, self.deadline - time.monotonic())
        later = sum(self.share[p] for p in self.parts[self.parts.index(part) + 1:])
        return max(5.0, self.deadline - time.monotonic() - later)

    def write(self) -> None:
        with self.lock:
            self.result["elapsed_s"] = round(time.monotonic() - self.start, 1)
            parts = {p: {k: v for k, v in e.items() if k != "_lines"} for p, e in self.result["parts"].items()}
            tmp = self.out / "gpu_check.json.tmp"
            tmp.write_text(json.dumps({**self.result, "parts": parts}, indent=1, default=str) + "\n")
            os.replace(tmp, self.out / "gpu_check.json")

    def run_part(self, part: str, cmd: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
        timeout = self.budget_for(part) if timeout is None else timeout
        with self.lock:
            self.log.write(f"\n===== {part} (budget {timeout:.0f}s) =====\n")
            print(f"===== gpu_check: {part} (budget {timeout:.0f}s)", flush=True)
        runner = Part(part, self.log, self.lock, prefix_log=self.parallel)
        rc, timed_out, seconds = runner.run(cmd, timeout, env or self.env)
        entry = self.result["parts"][part]
        entry.update(returncode=rc, seconds=round(seconds, 1), budget_s=round(timeout, 1),
                     status="timeout" if timed_out else ("passed" if rc == 0 else "failed"))
        if rc not in (0, None) and not timed_out:
            entry["error_tail"] = "\n".join(runner.lines[-15:])
        entry["_lines"] = runner.lines
        return entry

    # -- the parts
    def part_env(self) -> None:
        script = BENCH / "gpu_check_env.py"
        out = self.work / "env.json"
        entry = self.run_part("env", [self.py, str(script), "--device", self.device, "--json", str(out)])
        if out.is_file():
            entry["figures"] = json.loads(out.read_text())
            if not self.smoke and not entry["figures"].get("cuda_available"):
                entry["status"] = "failed"
                entry["error_tail"] = "no CUDA device: run with --smoke on a CPU machine"

    def part_tests(self) -> None:
        figures = self.work / "cuda_figures.jsonl"
        junit = self.work / "junit-cuda.xml"
        env = dict(self.env, CMBOOST_CUDA_FIGURES=str(figures))
        # Only the files that use the marker: collecting the whole suite would import modules whose optional
        # packages the GPU machine may lack, and one collection error stops every test.
        files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                       if "mark.cuda" in p.read_text())
        workers = []
        if not self.smoke and importlib.util.find_spec("xdist") is not None:
            workers = ["-n", "4"]  # pytest-xdist is on the GPU machine: the tests are mostly process starts
        cmd = [self.py, "-m", "pytest", "-m", "cuda", "-o", "addopts=", "-v", "-rfEs", "-p", "no:cacheprovider",
               *workers, f"--junitxml={junit}", *files]
        entry = self.run_part("tests", cmd, env=env)
        entry["files"] = files
        tests = parse_pytest(entry["_lines"], junit)
        entry["tests"] = tests
        counts = {}
        for outcome in tests.values():
            counts[outcome["outcome"]] = counts.get(outcome["outcome"], 0) + 1
        entry["counts"] = counts
        if figures.is_file():
            entry["figures"] = [json.loads(line) for line in figures.read_text().splitlines() if line.strip()]
        if entry["status"] == "passed" and tests and set(counts) == {"skipped"}:
            entry["status"] = "skipped"  # no GPU: every CUDA test skipped, as it should
        if entry.get("returncode") == 5:
            entry["status"] = "failed"
            entry["error_tail"] = "pytest collected no test marked cuda"

    def _bench(self, part: str, script: str, gpu_args: list[str], smoke_args: list[str], prep=None) -> dict:
        out = self.work / f"{part}.json"
        cmd = [self.py, str(BENCH / script), "--json", str(out), *(smoke_args if self.smoke else gpu_args)]
        if prep:
            cmd = ["bash", "-c", " && ".join([*prep, shlex.join(cmd)])]
        entry = self.run_part(part, cmd)
        if out.is_file():
            data = json.loads(out.read_text())
            entry["figures"] = data
            if entry["status"] == "timeout" and data.get("results"):
                entry["status"] = "timeout (partial figures)"
        return entry

    def part_boost(self) -> None:
        peak = self.result["parts"].get("env", {}).get("figures", {}).get("bf16_matmul_tflops")
        floor = ["--peak-tflops", f"{peak:.1f}"] if peak else []  # the FLOP floor this GPU showed, else 790
        self._bench("boost", "boost_speed.py",
                    ["--arch", "wide_resnet50_2", "--images", "5000", "--batch", "1000", "--steps", "15",
                     "--image-size", "64", "--device", self.device, "--compile", "--profile", *floor],
                    ["--arch", "resnet_small", "--images", "8", "--batch", "8", "--steps", "2", "--image-size", "32",
                     "--num-classes", "10", "--device", self.device, "--profile",
                     *(["--compile"] if self.args.smoke_compile else [])])

    def part_train_jcd(self) -> None:
        self._bench("train_jcd", "train_jcd_speed.py",
                    ["--arch", "wide_resnet50_2", "--batch", "128", "--image-size", "64", "--num-classes", "1000",
                     "--iters", "10", "--warmup", "3", "--device", self.device, "--profile"],
                    ["--arch", "resnet_small", "--batch", "4", "--image-size", "16", "--num-classes", "10",
                     "--iters", "1", "--warmup", "1", "--device", self.device])

    def part_sample(self) -> None:
        self._bench("sample", "cm_sample_speed.py",
                    ["--config", "imagenet64", "--batch", "256", "--iters", "10", "--warmup", "3",
                     "--device", self.device],
                    ["--config", "small", "--batch", "2", "--iters", "1", "--warmup", "1", "--device", self.device])

    def part_features(self) -> None:
        # FID sets: Fashion-MNIST test images against 1-step samples of the shipped CT model (grey, 32x32)
        num = 2 if self.smoke else 5000
        real, fake = self.work / "fid-real.npz", self.work / "fid-ct1.npz"
        cmb = shlex.join([self.py, "-m", "cmboost"])
        prep = [f"{cmb} export-data --data fmnist --split test --stop {num} --image-size 32 --out {shlex.quote(str(real))}"
                f" --overwrite",
                f"{cmb} sample --model {shlex.quote(str(ROOT / 'cmboost/assets/fmnist/ct.safetensors'))} --steps 1"
                f" --num {num} --seed 7 --out {shlex.quote(str(fake))} --device {self.device} --no-progress --overwrite"]
        self._bench("features", "features_speed.py",
                    ["--device", self.device, "--num-images", "5000", "--batch-size", "500", "--image-size", "64",
                     "--precision", "bf16", "--skip-fmnist", "--fid-images", str(real), str(fake), "--fid-num", str(num)],
                    ["--device", self.device, "--allow-cpu", "--num-images", "1", "--batch-size", "1", "--image-size", "32",
                     "--precision", "fp32", "--skip-fmnist", "--fid-images", str(real), str(fake), "--fid-num", str(num)],
                    prep=prep)

    def part_fmnist(self) -> None:
        runs = self.work / "fmnist"
        budget = self.budget_for("fmnist")
        env = dict(self.env, RUNS=str(runs), BUDGET_S=str(int(max(10, budget - 20))), DEVICE=self.device,
                   CMB=shlex.join([self.py, "-m", "cmboost"]), PY=self.py, SMOKE="1" if self.smoke else "0")
        if self.data_dir:
            env["DATA_DIR"] = str(self.data_dir)
        entry = self.run_part("fmnist", ["bash", str(ROOT / "recipes" / "fmnist-gpu.sh")], timeout=budget, env=env)
        entry["stages"] = [line[len("fmnist-gpu: "):] for line in entry["_lines"] if line.startswith("fmnist-gpu: ")]
        entry["figures"] = collect_fmnist(runs, self.out / "fmnist")

    # -- all
    def one_part(self, part: str) -> None:
        if part != "env" and self.result["parts"].get("env", {}).get("status") == "failed" and not self.smoke:
            self.result["parts"][part]["status"] = "skipped: the environment part failed"
            return
        try:
            getattr(self, f"part_{part}")()
        except Exception as err:  # a bug here must not cost the other parts
            self.result["parts"][part].update(status="error", error_tail=f"{type(err).__name__}: {err}")
        self.result["parts"][part].pop("_lines", None)
        self.write()

    def run(self) -> int:
        print(f"gpu_check: {self.result['mode']} run on {self.device}, budget {self.args.budget_s}s, parts "
              f"{','.join(self.parts)}; out {self.out}, work {self.work}", flush=True)
        self.write()
        beside = None
        try:
            if self.parallel:
                beside = threading.Thread(target=self.one_part, args=("fmnist",), daemon=True)
                beside.start()
            for part in self.parts:
                if not (self.parallel and part == "fmnist"):
                    self.one_part(part)
            if beside is not None:
                beside.join()
        finally:
            self.result["targets"] = targets(self.result["parts"], self.smoke)
            self.result["out_files"] = check_out(self.out)
            self.write()
            self.log.close()
            if self.remove_work:
                shutil.rmtree(self.work, ignore_errors=True)
        print(summary(self.result), flush=True)
        bad = [p for p, e in self.result["parts"].items() if e["status"] in ("failed", "error")]
        return 1 if bad else 0


# ----------------------------------------------------------------------------- reading results

# "tests/x.py::name PASSED [ 5%]", or with pytest-xdist "[gw0] [ 5%] PASSED tests/x.py::name"
PYTEST_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")
XDIST_LINE = re.compile(r"^\[gw\d+\]\s+\[\s*\d+%\]\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\s+(tests/\S+::\S+)")


def parse_pytest(lines: list[str], junit: Path) -> dict:
    """{test id: {outcome, seconds?, message?}} from the JUnit XML when pytest finished, else from its -v lines."""
    tests: dict = {}
    for line in lines:
        m = PYTEST_LINE.match(line)
        if m:
            tests[m.group(1)] = {"outcome": m.group(2).lower()}
        m = XDIST_LINE.match(line)
        if m:
            tests[m.group(2)] = {"outcome": m.group(1).lower()}
    if junit.is_file():
        import xml.etree.ElementTree as ET

        try:
            root = ET.parse(junit).getroot()
        except ET.ParseError:
            return tests
        for case in root.iter("testcase"):
            path = case.get("classname", "").replace(".", "/") + ".py"
            key = f"{path}::{case.get('name')}"
            outcome = "passed"
            message = None
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    message = (node.get("message") or "")[:300]
            tests[key] = {"outcome": outcome, "seconds": round(float(case.get("time", 0)), 2),
                          **({"message": message} if message else {})}
    return tests


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def safetensors_info(path: Path) -> dict:
    """The cmboost.info record of a checkpoint (iterations, training settings), read from the header."""
    import struct

    try:
        with open(path, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        return json.loads(header.get("__metadata__", {}).get("cmboost.info", "{}"))
    except (OSError, ValueError, struct.error):
        return {}


def collect_fmnist(runs: Path, dest: Path) -> dict:
    """Copies the recipe's checkpoints to `dest` and gathers its training logs and FID check."""
    dest.mkdir(parents=True, exist_ok=True)
    figures: dict = {"stages": {}, "fid": {}}
    logs: dict = {}
    for stage, run, name in (("edm", "fmnist-edm", "edm"), ("ct", "fmnist-ct", "ct"), ("cd", "fmnist-cd", "cd"),
                             ("jcd", "fmnist-jcd-joint", "jcd-joint")):
        model = runs / run / "model.safetensors"
        log = read_log(runs / run / "log.jsonl")
        logs[stage] = log
        row: dict = {"exported": model.is_file(), "log_records": len(log)}
        if log:
            last = log[-1]
            row["last_iteration"] = last.get("iter", last.get("step"))
            row["last_loss"] = last.get("loss")
            speeds = [r["sec_per_iter"] for r in log[1:] if "sec_per_iter" in r]  # the first window holds start-up
            if speeds:
                row["sec_per_iter"] = sum(speeds) / len(speeds)
            rates = [r["images_per_s"] for r in log[1:] if "images_per_s" in r]
            if rates:
                row["images_per_s"] = sum(rates) / len(rates)
        if model.is_file():
            info = safetensors_info(model)
            if "iterations" in info:
                row["exported_iterations"] = info["iterations"]
            row["bytes"] = model.stat().st_size
            shutil.copyfile(model, dest / f"{name}.safetensors")
        figures["stages"][stage] = row
    check = runs / "fmnist-check"
    for path in sorted(check.glob("fid-*.json")):
        data = json.loads(path.read_text())
        figures["fid"][path.stem[4:]] = {k: data.get(k) for k in ("fid", "kid", "precision", "recall", "is",
                                                                 "num_samples")}
    fid = figures["fid"]
    for gen in ("ct1", "cd1"):
        if gen in fid and f"shipped-{gen}" in fid and fid[gen]["fid"] and fid[f"shipped-{gen}"]["fid"]:
            figures[f"fid_{gen}_new_over_shipped"] = fid[gen]["fid"] / fid[f"shipped-{gen}"]["fid"]
    (dest / "training.json").write_text(json.dumps({"logs": logs, "figures": figures}, indent=1) + "\n")
    return figures


def _best(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return max(values) if values else None


def targets(parts: dict, smoke: bool) -> list[dict]:
    """Issue 22's targets against what was measured (a CPU smoke run measures nothing: marked so)."""
    rows = []

    def add(key, value, higher_is_better=True):
        what, goal = TARGETS[key]
        met = None if value is None or smoke else (value >= goal if higher_is_better else value <= goal)
        rows.append({"target": what, "goal": goal, "value": value, "met": met,
                     **({"note": "CPU smoke run: toy sizes, not a measurement"} if smoke else {})})

    res = lambda part: parts.get(part, {}).get("figures", {}).get("results", {}) or {}  # noqa: E731
    boost = res("boost")
    arch = boost.get("wide_resnet50_2") or next(iter(boost.values()), {})
    add("boost", _best([arch.get("ratio_eager"), arch.get("ratio_compiled")]))
    jcd = next(iter(res("train_jcd").values()), {})
    add("train_jcd", jcd.get("ratio"))
    sample = res("sample")
    add("sample", _best([v.get("ratio") for k, v in sample.items() if k.startswith("bf16")]))
    feats = res("features")
    add("features", feats.get("inception", {}).get("ratio"))
    fid = feats.get("fid", {})
    add("features_fid", fid.get("max_abs_fid_diff"), higher_is_better=False)
    return rows


def check_out(out: Path) -> dict:
    files = [p for p in out.rglob("*") if p.is_file()]
    listing = {str(p.relative_to(out)): p.stat().st_size for p in sorted(files)}
    problems = []
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files: the device tool returns {MAX_FILES}")
    problems += [f"{name}: {size / 2**20:.1f} MiB > 16 MiB" for name, size in listing.items() if size > MAX_FILE_BYTES]
    problems += [f"{name}: deeper than 2 folders" for name in listing if name.count("/") > 2]
    return {"files": listing, "problems": problems}


def summary(result: dict) -> str:
    lines = [f"gpu_check {result['mode']}: {result['elapsed_s']}s of {result['budget_s']}s, commit {result['commit']}"]
    for part, entry in result["parts"].items():
        extra = ""
        if part == "tests" and entry.get("counts"):
            extra = " " + ", ".join(f"{n} {k}" for k, n in sorted(entry["counts"].items()))
        lines.append(f"  {part:10s} {entry['status']:28s} {entry.get('seconds', 0):7.1f}s / "
                     f"{entry.get('budget_s', 0):.0f}s{extra}")
        if entry.get("error_tail"):
            lines += ["      " + line for line in entry["error_tail"].splitlines()[-6:]]
    for row in result.get("targets", []):
        value = "n/a" if row["value"] is None else f"{row['value']:.4g}"
        met = {True: "met", False: "MISSED", None: "smoke: toy sizes" if row.get("note") else "not measured"}[row["met"]]
        lines.append(f"  target: {row['target']} >= {row['goal']}: {value} ({met})"
                     if "at most" not in row["target"] else
                     f"  target: {row['target']} {row['goal']}: {value} ({met})")
    for problem in result.get("out_files", {}).get("problems", []):
        lines.append(f"  out: {problem}")
    return "\n".join(lines)


def table_rows(result: dict) -> list[str]:
    """Markdown rows for benchmarks/README.md's table of figures, from a gpu_check.json."""
    env = result["parts"].get("env", {}).get("figures", {})
    gpu = env.get("gpu", result.get("device", "?"))
    torch_version = (env.get("versions") or {}).get("torch", "?")
    date = result.get("date", "?")[:10]
    rows = []

    def row(part, batch, figure, ratio):
        ratio_text = "" if ratio is None else f"{ratio:.2f}x"
        rows.append(f"| {gpu} | {torch_version} | {part} | {batch} | {figure} | {ratio_text} | {date} |")

    res = lambda part: result["parts"].get(part, {}).get("figures", {}).get("results", {}) or {}  # noqa: E731
    settings = lambda part: result["parts"].get(part, {}).get("figures", {}).get("settings", {}) or {}  # noqa: E731
    for arch, r in res("boost").items():
        s = settings("boost")
        for name in ("eager", "compiled"):
            if f"ours_{name}_img_s" in r:
                row(f"boost {arch} {s.get('steps')} steps ({name})", f"{s.get('batch')} (released 100)",
                    f"{r[f'ours_{name}_img_s']:.0f} img/s vs {r['released_img_s']:.0f}", r[f"ratio_{name}"])
    for arch, r in res("train_jcd").items():
        s = settings("train_jcd")
        if "ours_img_s" in r:
            row(f"train-jcd {arch}", f"{s.get('batch_real')}+{s.get('batch_generated')}",
                f"{r['ours_it_s']:.2f} it/s vs {r['released_it_s']:.2f}", r["ratio"])
    for path, r in res("sample").items():
        if path != "best" and "img_s" in r:
            row(f"1-step sampling {settings('sample').get('config')}, {path}", settings("sample").get("batch"),
                f"{r['img_s']:.0f} img/s", r["ratio"])
    feats = res("features")
    if "inception" in feats:
        r = feats["inception"]
        row("Inception features", settings("features").get("batch"),
            f"{r['ours_img_s']:.0f} img/s vs {r['torch_fidelity_img_s']:.0f}", r["ratio"])
    if "fid" in feats:
        r = feats["fid"]
        row("Inception FID, ours - torch-fidelity", r.get("images_per_set"), f"max diff {r['max_abs_fid_diff']:.4f}", None)
    fm = result["parts"].get("fmnist", {}).get("figures", {})
    for gen in ("ct1", "cd1"):
        new, old = fm.get("fid", {}).get(gen), fm.get("fid", {}).get(f"shipped-{gen}")
        if new and old and new.get("fid") and old.get("fid"):
            row(f"Fashion-MNIST {gen.upper()} FID (fmnist judge), GPU recipe vs shipped", new.get("num_samples"),
                f"{new['fid']:.2f} vs {old['fid']:.2f}", None)
    boosted, plain = fm.get("fid", {}).get("boosted-ct1"), fm.get("fid", {}).get("ct1")
    if boosted and plain and boosted.get("fid") and plain.get("fid"):
        row("Fashion-MNIST CT1 FID (fmnist judge), boosted by the GPU joint network (PGD) vs not",
            boosted.get("num_samples"), f"{boosted['fid']:.2f} vs {plain['fid']:.2f}", None)
    return rows


def commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        if done.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return done.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    stamp = ROOT / ".gpu-carry" / "commit.txt"  # written by benchmarks/prepare_gpu_carry.sh: the copy has no .git
    return stamp.read_text().strip() if stamp.is_file() else "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out",
                        help="output folder (default: $OUT where set, as on the device machine, else gpu-check-out)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total seconds for all parts (default: 540 on the GPU; 420 for --smoke, a guard against hangs)")
    parser.add_argument("--smoke", action="store_true", help="every part at toy sizes on the CPU (under 2 minutes)")
    parser.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the Fashion-MNIST .gz files (default: .gpu-carry/fashion-mnist if there, "
                             "else $CMBOOST_FMNIST_DIR or the system copy)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu for --smoke")
    parser.add_argument("--work-dir", default=None, help="scratch folder, kept (default: a new one under /tmp, "
                                                         "removed at the end unless --keep-work)")
    parser.add_argument("--keep-work", action="store_true", help="keep the default scratch folder")
    parser.add_argument("--table", default=None, metavar="GPU_CHECK_JSON",
                        help="print the README table rows of a finished run's gpu_check.json, and exit")
    parser.add_argument("--smoke-compile", action="store_true", help="--smoke: also torch.compile in the boost part "
                                                                     "(needs a C++ compiler; a minute more)")
    args = parser.parse_args(argv)
    if args.table:
        print("\n".join(table_rows(json.loads(Path(args.table).read_text()))))
        return 0
    if args.budget_s is None:
        args.budget_s = 420.0 if args.smoke else 540.0
    if args.budget_s < 60:
        parser.error(f"--budget-s {args.budget_s}: at least 60")
    print(f"gpu_check: python {platform.python_version()} at {sys.executable}", flush=True)
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
