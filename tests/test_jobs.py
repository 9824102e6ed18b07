"""Resumable jobs under crashes and concurrency: never a silently mixed output, byte-identical after any crash."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cmboost
from cmboost.jobs import job as jobs
from cmboost.jobs import parts
from cmboost.boosting.boost import BoostRun, boost
from cmboost.cli import main as cli_main
from cmboost.cm.sample import SampleRun, sample
from cmboost.errors import UserInputError
from cmboost.jcd.model import load_joint_model
from cmboost.files.samples import save_samples

ASSETS = Path(cmboost.__file__).parent / "assets" / "fmnist"
JCD = ASSETS / "jcd-joint-w24.safetensors"
PGD = {"eps": 1.0, "steps": 2}


@pytest.fixture(scope="module")
def model():
    return load_joint_model(JCD)


def _boost(samples, out, **fields):
    """`cmboost boost` of `samples` with the shipped network and PGD: one call of the verb's function."""
    return boost(BoostRun(samples=str(samples), model=str(JCD), out=str(out), method="pgd", hyper=PGD, batch_size=4,
                          device="cpu", progress=False, **fields))


def _samples(path, seed=0, n=8):
    rng = np.random.default_rng(seed)
    return save_samples(path, rng.integers(0, 256, (n, 1, 32, 32), dtype=np.uint8), np.arange(n) % 10, overwrite=True)


class Killed(BaseException):
    """Stands for kill -9 at a chosen moment (BaseException: no handler treats it as an error)."""


def _die_after_first_part(monkeypatch):
    real = parts._write_part
    calls = []

    def write_then_die(*args):
        real(*args)
        calls.append(1)
        if len(calls) == 1:
            raise Killed

    monkeypatch.setattr(parts, "_write_part", write_then_die)


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_the_lock(tmp_path):
    src = _samples(tmp_path / "in.npz")
    out = tmp_path / "out.npz"
    parts = jobs.job_dir(out)
    parts.mkdir()
    with jobs._locked(parts, str(parts)):  # a first run, still writing
        with pytest.raises(UserInputError, match="another cmboost run is writing"):
            _boost(src, out, grid=False)
    assert not out.exists() and parts.is_dir()  # the first run's folder is left alone
    _boost(src, out, grid=False)  # lock gone: runs
    assert out.exists() and not parts.exists()


def test_an_input_replaced_before_the_resume_is_refused(tmp_path, monkeypatch):
    src = _samples(tmp_path / "in.npz")
    out = tmp_path / "out.npz"
    with monkeypatch.context() as m:
        _die_after_first_part(m)
        with pytest.raises(Killed):
            _boost(src, out, grid=False)
    _samples(src, seed=1)  # same path, same size, other images
    with pytest.raises(UserInputError, match="samples_digest"):
        _boost(src, out, grid=False)


def test_a_model_replaced_before_a_sample_resume_is_refused(tmp_path, monkeypatch):
    model = tmp_path / "cm.safetensors"
    shutil.copy(ASSETS / "cd.safetensors", model)
    out = tmp_path / "s.npz"
    with monkeypatch.context() as m:
        _die_after_first_part(m)
        with pytest.raises(Killed):
            sample(SampleRun(model=str(model), out=str(out), num=8, batch_size=4, progress=False))
    shutil.copy(ASSETS / "ct.safetensors", model)
    with pytest.raises(UserInputError, match="model_digest"):
        sample(SampleRun(model=str(model), out=str(out), num=8, batch_size=4, progress=False))


def test_a_torn_configuration_record_is_named_with_its_fix(tmp_path, monkeypatch):
    src = _samples(tmp_path / "in.npz")
    out = tmp_path / "out.npz"
    with monkeypatch.context() as m:
        _die_after_first_part(m)
        with pytest.raises(Killed):
            _boost(src, out, grid=False)
    record = jobs.job_dir(out) / jobs.CONFIG_FILE
    record.write_text(record.read_text()[:40])
    with pytest.raises(UserInputError, match=r"config.json: damaged record .* delete .*out.npz.job"):
        _boost(src, out, grid=False)


def test_killed_just_after_the_output_appeared_the_rerun_finishes(tmp_path, monkeypatch):
    src = _samples(tmp_path / "in.npz")
    straight = _boost(src, tmp_path / "straight.npz")
    out = tmp_path / "out.npz"
    with monkeypatch.context() as m:
        def killed(*args, **kwargs):
            raise Killed

        m.setattr(jobs.Job, "finish", killed)  # dies between writing the output and cleaning up
        with pytest.raises(Killed):
            _boost(src, out)
    assert out.exists() and jobs.job_dir(out).is_dir() and not out.with_suffix(".grid.png").exists()
    _boost(src, out)  # the same command again
    assert out.read_bytes() == straight.read_bytes()
    assert out.with_suffix(".grid.png").exists() and not jobs.job_dir(out).exists()


def test_an_error_before_any_batch_leaves_no_parts_folder(tmp_path):
    out = tmp_path / "out.npz"

    def bad_batch(indices):
        raise UserInputError("images contain NaN or inf")

    with pytest.raises(UserInputError):
        parts.run_parts(out, 8, 4, bad_batch, {"what": "test"}, progress=False)
    assert not out.exists() and not jobs.job_dir(out).exists()


def test_the_batch_size_may_change_on_resume_only_where_the_caller_allows(tmp_path):
    def batch(indices):
        return np.full((len(indices), 1, 2, 2), indices[0], np.uint8) + np.arange(len(indices), dtype=np.uint8)[
            :, None, None, None], None

    out = tmp_path / "out.npz"
    with pytest.raises(Killed):
        parts.run_parts(out, 8, 3, lambda idx: (_ for _ in ()).throw(Killed) if idx[0] >= 3 else batch(idx),
                       {"what": "test"}, may_change=("batch_size",), progress=False)
    parts.run_parts(out, 8, 5, batch, {"what": "test"}, may_change=("batch_size",), progress=False)
    straight = parts.run_parts(tmp_path / "straight.npz", 8, 8, batch, {"what": "test"}, progress=False)
    assert out.read_bytes() == straight.read_bytes()
    with pytest.raises(Killed):
        parts.run_parts(tmp_path / "fixed.npz", 8, 3, lambda idx: (_ for _ in ()).throw(Killed) if idx[0] >= 3
                       else batch(idx), {"what": "test"}, progress=False)
    with pytest.raises(UserInputError, match="batch_size was 3, now 5"):
        parts.run_parts(tmp_path / "fixed.npz", 8, 5, batch, {"what": "test"}, progress=False)


def _tiny_train_args(run_dir):
    return ["train-jcd", "--data", "fmnist", "--arch", "resnet_small", "--width", "4", "--objective", "ce",
            "--iters", "6", "--batch-size", "8", "--real-limit", "64", "--real-steps", "1", "--log-every", "1",
            "--ckpt-every", "1", "--device", "cpu", "--run-dir", str(run_dir)]


def test_train_jcd_killed_with_sigkill_resumes_to_the_same_bytes(tmp_path):
    run_dir = tmp_path / "run"
    assert cli_main(_tiny_train_args(run_dir)) == 0
    straight = (run_dir / "model.safetensors").read_bytes()
    shutil.rmtree(run_dir)

    cmd = [sys.executable, "-m", "cmboost", *_tiny_train_args(run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run_dir / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model.safetensors").exists(), "the run finished before it could be killed"
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    assert (run_dir / "model.safetensors").read_bytes() == straight


def _pattern_batch(indices):
    images = (np.arange(len(indices) * 256, dtype=np.int64).reshape(len(indices), 1, 16, 16) * 7
              + 13 * indices[0]).astype(np.uint8)
    return images, np.asarray(indices, dtype=np.int64) % 10


def _truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _flip_a_pixel(file):  # the zip stays readable; the member's CRC no longer matches
    data = bytearray(file.read_bytes())
    with np.load(file) as archive:
        at = bytes(data).find(archive["images"].tobytes())
    assert at > 0
    data[at + 5] ^= 0xFF
    file.write_bytes(bytes(data))


def _relabel(file):  # a whole, readable zip whose contents are not the part its name says
    with np.load(file) as archive:
        arrays = {k: archive[k] for k in archive.files}
    arrays["indices"] = arrays["indices"] + 1
    with open(file, "wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize("damage", [_truncate, _flip_a_pixel, _relabel], ids=["truncated", "bad-crc", "relabelled"])
def test_a_damaged_part_is_named_recomputed_and_the_output_is_byte_identical(tmp_path, damage, capsys):
    straight = parts.run_parts(tmp_path / "straight.npz", 12, 4, _pattern_batch, {"what": "test"}, progress=False)
    out = tmp_path / "out.npz"
    with pytest.raises(Killed):
        parts.run_parts(out, 12, 4, lambda idx: (_ for _ in ()).throw(Killed) if idx[0] >= 8 else _pattern_batch(idx),
                       {"what": "test"}, progress=False)
    part = sorted(jobs.job_dir(out).glob("part-*.npz"))[0]
    damage(part)
    capsys.readouterr()
    parts.run_parts(out, 12, 4, _pattern_batch, {"what": "test"}, progress=False)  # the same job again
    err = capsys.readouterr().err
    assert f"{part}: damaged part file" in err and "Traceback" not in err
    assert out.read_bytes() == straight.read_bytes() and not jobs.job_dir(out).exists()


# ----------------------------------------------------------------------------- a job folder is cmboost's alone

def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


FOREIGN_JOB_FOLDERS = {
    "user-notes": {"notes.txt": "mine"},
    "torn-config": {"config.json": '{"what": "te'},
    "non-object-config": {"config.json": "[1, 2]"},
}


@pytest.mark.parametrize("contents", FOREIGN_JOB_FOLDERS.values(), ids=FOREIGN_JOB_FOLDERS.keys())
@pytest.mark.parametrize("overwrite", [False, True], ids=["", "overwrite"])
def test_a_job_folder_cmboost_did_not_make_is_refused_and_left_as_it_was(tmp_path, contents, overwrite):
    out = tmp_path / "x.npz"
    folder = jobs.job_dir(out)
    folder.mkdir()
    for name, text in contents.items():
        (folder / name).write_text(text)
    before = _snapshot(folder)
    for _ in range(2):  # the refusal changes nothing, so a second run is refused the same way
        with pytest.raises(UserInputError, match=f"{folder}: a folder cmboost did not make"):
            parts.run_parts(out, 8, 4, _pattern_batch, {"what": "test"}, overwrite=overwrite, progress=False)
        assert _snapshot(folder) == before and not out.exists()


def test_boost_refuses_a_folder_of_the_users_before_any_work(tmp_path):
    src = _samples(tmp_path / "in.npz")
    out = tmp_path / "x.npz"
    (jobs.job_dir(out)).mkdir()
    (jobs.job_dir(out) / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="x.npz.job: a folder cmboost did not make"):
        _boost(src, out, grid=False, overwrite=True)
    assert (jobs.job_dir(out) / "notes.txt").read_text() == "mine" and not out.exists()


def test_a_job_folder_that_is_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path):
    users = tmp_path / "users-folder"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    out = tmp_path / "x.npz"
    jobs.job_dir(out).symlink_to(users, target_is_directory=True)
    with pytest.raises(UserInputError, match="x.npz.job: is a symbolic link"):
        parts.run_parts(out, 8, 4, _pattern_batch, {"what": "test"}, progress=False)
    jobs.job_dir(tmp_path / "t.json").symlink_to(users, target_is_directory=True)
    with pytest.raises(UserInputError, match="t.json.job: is a symbolic link"):  # tune's way in
        with jobs.Job(jobs.job_dir(tmp_path / "t.json"), {"what": "test"}):
            pass  # never reached
    assert sorted(p.name for p in users.iterdir()) == ["notes.txt"] and jobs.job_dir(out).is_symlink()


def test_a_refusal_over_another_runs_configuration_removes_nothing(tmp_path):
    folder = jobs.job_dir(tmp_path / "tuned.json")
    with pytest.raises(Killed):
        with jobs.Job(folder, {"what": "tune", "eps": 1.0}) as job:
            job.put_row("none", {"fid": 3.0})
            raise Killed
    (folder / jobs.ROWS_FILE).unlink()  # a job of another run, with its configuration and no results
    before = _snapshot(folder)
    for _ in range(2):
        with pytest.raises(UserInputError, match="eps was 1.0, now 2.0"):
            with jobs.Job(folder, {"what": "tune", "eps": 2.0}):
                pass
        assert _snapshot(folder) == before


def test_finishing_removes_only_the_files_cmboost_wrote(tmp_path):
    """An older cmboost's job (a readable config.json, no marker) is adopted and resumed; a file of the
    user's found in it survives the finish, and so does its folder."""
    straight = parts.run_parts(tmp_path / "straight.npz", 12, 4, _pattern_batch, {"what": "test"}, progress=False)
    out = tmp_path / "out.npz"
    with pytest.raises(Killed):
        parts.run_parts(out, 12, 4, lambda idx: (_ for _ in ()).throw(Killed) if idx[0] >= 8 else _pattern_batch(idx),
                       {"what": "test"}, progress=False)
    folder = jobs.job_dir(out)
    (folder / jobs.MARKER_FILE).unlink()  # as an older cmboost left it
    (folder / "notes.txt").write_text("mine")
    parts.run_parts(out, 12, 4, _pattern_batch, {"what": "test"}, progress=False)
    assert out.read_bytes() == straight.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_an_empty_job_folder_left_by_a_killed_run_is_adopted(tmp_path):
    out = tmp_path / "out.npz"
    jobs.job_dir(out).mkdir()  # killed between making the folder and writing its marker
    parts.run_parts(out, 4, 4, _pattern_batch, {"what": "test"}, progress=False)
    assert out.is_file() and not jobs.job_dir(out).exists()


def test_removing_a_job_folder_keeps_what_cmboost_did_not_write(tmp_path):
    folder = tmp_path / "r.json.job"
    folder.mkdir()
    cmboost_files = [jobs.MARKER_FILE, jobs.CONFIG_FILE, jobs.LOCK_FILE, jobs.ROWS_FILE, jobs.STATE_FILE,
                     jobs.LOG_FILE, "part-000000000-000004.npz", ".rows.json.k2j_3x.tmp"]
    for name in cmboost_files + ["notes.txt", ".hidden.tmp"]:
        (folder / name).write_text("x")
    jobs.remove_job_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == [".hidden.tmp", "notes.txt"]
    for name in ("notes.txt", ".hidden.tmp"):
        (folder / name).unlink()
    (folder / jobs.CONFIG_FILE).write_text("{}")
    jobs.remove_job_folder(folder)
    assert not folder.exists()


# ----------------------------------------------------------------------------- check-judges' job

@pytest.fixture(scope="module")
def judge_check_inputs():
    from cmboost.files.datasets import load_dataset
    from cmboost.metrics.judge_check import CheckSettings

    real, _, _ = load_dataset("fmnist", "test", image_size=32)
    generated, labels = real[100:120].copy(), np.arange(20) % 10
    settings = CheckSettings(bootstrap=2, transfer_eps=(1.0,), transfer_steps=1)
    return (real[:60], generated, labels), dict(attacker="fmnist-attacker", reference_count=40, probe_count=20,
                                                settings=settings, device="cpu", log=lambda *_: None)


def _judge_check_killed_after_first_judge(monkeypatch, folder, inputs):
    from cmboost.metrics import judge_check

    args, kwargs = inputs
    real = judge_check.check_judge
    calls = []

    def check_then_die(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise Killed  # as kill -9 or Ctrl-C between two judges
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(judge_check, "check_judge", check_then_die)
        with pytest.raises(Killed):
            judge_check.run_judge_check(["fmnist-allconv", "fmnist-resnet"], *args, **kwargs, job_folder=folder)
    assert (folder / jobs.ROWS_FILE).is_file()


def test_check_judges_resumed_after_a_kill_writes_a_straight_runs_bytes(tmp_path, monkeypatch, judge_check_inputs):
    from cmboost.metrics.judge_check import run_judge_check

    args, kwargs = judge_check_inputs
    straight = run_judge_check(["fmnist-allconv", "fmnist-resnet"], *args, **kwargs, job_folder=tmp_path / "a.job")
    folder = tmp_path / "b.job"
    _judge_check_killed_after_first_judge(monkeypatch, folder, judge_check_inputs)
    resumed = run_judge_check(["fmnist-allconv", "fmnist-resnet"], *args, **kwargs, job_folder=folder)
    assert json.dumps(resumed, indent=1) == json.dumps(straight, indent=1)


@pytest.mark.parametrize("damage", [lambda row: [row], lambda row: {k: v for k, v in row.items() if k != "transfer"},
                                    lambda row: dict(row, clean={"kid": 1.0})],
                         ids=["a-list", "no-transfer", "no-clean-fid"])
def test_a_damaged_check_judges_row_is_named_with_its_file_and_key(tmp_path, monkeypatch, judge_check_inputs,
                                                                   damage):
    from cmboost.metrics.judge_check import run_judge_check

    folder = tmp_path / "j.json.job"
    _judge_check_killed_after_first_judge(monkeypatch, folder, judge_check_inputs)
    rows = json.loads((folder / jobs.ROWS_FILE).read_text())
    rows["fmnist-allconv"] = damage(rows["fmnist-allconv"])
    (folder / jobs.ROWS_FILE).write_text(json.dumps(rows))
    args, kwargs = judge_check_inputs
    with pytest.raises(UserInputError, match=rf"{folder / jobs.ROWS_FILE}: fmnist-allconv: .*delete {folder}"):
        run_judge_check(["fmnist-allconv", "fmnist-resnet"], *args, **kwargs, job_folder=folder)


# ----------------------------------------------------------------------------- trainers' state

def _foreign_state(path, meta):
    import torch

    from cmboost.files.checkpoints import save_safetensors

    save_safetensors(path, {"model.other.weight": torch.zeros(3, 3)},
                     {"format": jobs.STATE_FORMAT, "step": "1", "meta": json.dumps(meta)})


def test_train_features_refuses_a_state_of_another_network_in_one_line(tmp_path):
    from cmboost.metrics.domain_net import DomainNetConfig
    from cmboost.metrics.domain_training import TrainSettings, train_domain_net

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (8, 1, 28, 28), dtype=np.uint8), np.arange(8) % 10
    config, settings = DomainNetConfig(widths=(4, 4, 4, 4), feature_dim=8), TrainSettings(epochs=1, batch_size=8)
    folder = tmp_path / "f.safetensors.job"
    train_domain_net(images, labels, config, settings, job_folder=folder, log=None)
    _foreign_state(folder / jobs.STATE_FILE, {"optimizer_groups": []})  # same job, another network's state
    with pytest.raises(UserInputError, match=r"state.safetensors: does not fit this run's network \(model\).*"
                                             r"another run's training state"):
        train_domain_net(images, labels, config, settings, job_folder=folder, log=None)


@pytest.mark.parametrize("meta", [[1, 2], {"scheduler": {}}], ids=["meta-a-list", "no-optimizer-groups"])
def test_a_training_state_without_its_meta_is_named_with_the_file_and_key(tmp_path, meta):
    with jobs.Job(tmp_path / "run", {"what": "train"}) as job:
        _foreign_state(job.state_path, meta)
        with pytest.raises(UserInputError, match=r"state.safetensors: damaged training state \(meta"):
            job.load_state()


def test_a_damaged_demo_row_is_named_with_rows_json_and_its_key(tmp_path):
    from cmboost.demo.plan import METRICS, demo_row_problem

    good = {"judges": {"fmnist-allconv": {k: 1.0 for k in METRICS}}, "mean_l2_change": 0.0}
    out = tmp_path / "demo"
    with jobs.Job(out, {"what": "demo"}, row_problem=demo_row_problem) as job:
        job.put_row('["ct1", 0]', good)
    assert not (out / jobs.LOCK_FILE).exists()  # a kept job folder keeps no lock file once the run is over
    for damaged in ([good], {"judges": {}}, dict(good, mean_l2_change="x"),
                    dict(good, judges={"fmnist-allconv": {"fid": 1.0}})):
        (out / jobs.ROWS_FILE).write_text(json.dumps({'["ct1", 0]': damaged}))
        with jobs.Job(out, {"what": "demo"}, row_problem=demo_row_problem, fresh="pass --overwrite") as job:
            with pytest.raises(UserInputError, match=r'rows.json: \["ct1", 0\]: .*; pass --overwrite'):
                job.row('["ct1", 0]')


def test_a_training_state_restores_networks_optimizer_scheduler_and_rng_exactly(tmp_path):
    """TrainingState, the one checkpoint helper of the three trainers: what it saves into a job comes
    back bit for bit, and a state of another network is refused in one line."""
    from cmboost.jobs.training_state import TrainingState

    def trainer(seed):
        torch.manual_seed(seed)
        net = torch.nn.Linear(3, 2)
        optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2, 4], gamma=0.5)
        return net, optimizer, scheduler

    net, optimizer, scheduler = trainer(0)
    for _ in range(3):
        net(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    with jobs.Job(tmp_path / "run", {"a": 1}) as job:
        TrainingState({"model": net}, optimizer, scheduler, rng=True).save(job, 3)
        expected_draw = torch.rand(1)
        fresh, fresh_optimizer, fresh_scheduler = trainer(1)
        torch.manual_seed(99)
        state = TrainingState({"model": fresh}, fresh_optimizer, fresh_scheduler, rng=True)
        assert state.load(job) == 3
        assert torch.equal(torch.rand(1), expected_draw)  # the RNG continues where it was saved
        for a, b in zip(net.state_dict().values(), fresh.state_dict().values()):
            assert torch.equal(a, b)
        assert fresh_scheduler.state_dict() == scheduler.state_dict()
        saved, restored = optimizer.state_dict(), fresh_optimizer.state_dict()
        assert json.loads(json.dumps(restored["param_groups"])) == json.loads(json.dumps(saved["param_groups"]))
        for index, values in saved["state"].items():
            assert set(restored["state"][index]) == set(values)
            assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(restored["state"][index][k]))
                       for k, v in values.items())
        with pytest.raises(UserInputError, match="another run's training state"):
            TrainingState({"model": torch.nn.Linear(5, 2)}, fresh_optimizer).load(job)
