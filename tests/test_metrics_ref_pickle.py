"""EDM2-style reference pickles: the restricted unpickler refuses code (a malicious pickle must not
run), reads EDM2's layout and flat mu/sigma dicts, and cmboost's own .pkl round-trips."""

import os
import pickle

import numpy as np
import pytest

from cmboost.errors import UserInputError
from cmboost.metrics.dinov2 import DINOV2_IDENTITY
from cmboost.metrics.ref_pickle import fd_key, read_pickle, save_pickled_references
from cmboost.metrics.reference import OPENAI_FEATURE_NET, load_reference, load_references


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Evals:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _stats(rng, dim):
    x = rng.standard_normal((dim + 5, dim))
    return {"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)}


@pytest.mark.parametrize("payload", [_RunsShell, _Evals])
def test_a_malicious_pickle_is_refused_before_it_runs(tmp_path, payload):
    marker = tmp_path / "marker"
    rng = np.random.default_rng(0)
    path = tmp_path / "img64.pkl"
    # hidden inside an otherwise valid EDM2 dict, after the arrays
    path.write_bytes(pickle.dumps({"num_images": 10, "fid": _stats(rng, 4), "extra": payload(marker)}))
    with pytest.raises(UserInputError) as err:
        load_references(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "refused to unpickle" in message
    assert ("system" in message) or ("eval" in message)
    assert not marker.exists()
    # the same bytes do run under a plain pickle.load: the test payload is real
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_other_globals_are_refused_too(tmp_path):
    path = tmp_path / "x.pkl"
    when = __import__("datetime").date(2024, 1, 1)
    path.write_bytes(pickle.dumps({"mu": np.zeros(3), "sigma": np.eye(3), "when": when}))
    with pytest.raises(UserInputError, match="refused to unpickle datetime.date"):
        read_pickle(path)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_edm2_layout_gives_one_reference_per_network(tmp_path, protocol):
    rng = np.random.default_rng(1)
    fid, dino = _stats(rng, 6), _stats(rng, 4)
    path = tmp_path / "img64.pkl"
    path.write_bytes(pickle.dumps({"num_images": np.int64(1281167), "fid": fid, "fd_dinov2": dino,
                                   "scale": np.float64(0.5)}, protocol=protocol))
    refs = load_references(str(path))
    assert [r.net for r in refs] == [OPENAI_FEATURE_NET, DINOV2_IDENTITY]
    np.testing.assert_array_equal(refs[0].sigma, fid["sigma"])
    np.testing.assert_array_equal(refs[1].mu, dino["mu"])
    assert refs[0].count == 1281167 and refs[0].images is None and refs[0].features is None
    assert refs[0].source.endswith("img64.pkl [fid]")
    with pytest.raises(UserInputError, match="holds statistics of 2 feature networks"):
        load_reference(path)


def test_flat_dicts_name_their_network_or_are_told_apart_by_width(tmp_path):
    rng = np.random.default_rng(2)
    flat = tmp_path / "flat.pkl"
    flat.write_bytes(pickle.dumps({"mu": np.zeros(2048), "sigma": np.eye(2048), "num_images": 50000}))
    assert load_reference(flat).net == OPENAI_FEATURE_NET and load_reference(flat).count == 50000
    flat.write_bytes(pickle.dumps(_stats(rng, 1024)))
    assert load_reference(flat).net == DINOV2_IDENTITY
    flat.write_bytes(pickle.dumps({**_stats(rng, 3), "feature_net": "domain-net-abc"}))
    assert load_reference(flat).net == "domain-net-abc"
    flat.write_bytes(pickle.dumps(_stats(rng, 7)))
    with pytest.raises(UserInputError, match="cannot tell which feature network"):
        load_reference(flat)


def test_broken_pickles_are_one_line_errors(tmp_path):
    path = tmp_path / "r.pkl"
    path.write_bytes(pickle.dumps({"fid": _stats(np.random.default_rng(3), 5)})[:-20])
    with pytest.raises(UserInputError, match="not a readable reference pickle"):
        load_references(path)
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(UserInputError, match="holds a list"):
        load_references(path)
    path.write_bytes(pickle.dumps({"fid": {"mu": np.zeros(3), "sigma": np.eye(4)}}))
    with pytest.raises(UserInputError, match=r"\[fid\]: mu \(3,\) and sigma \(4, 4\) do not match"):
        load_references(path)
    path.write_bytes(pickle.dumps({"fid": {"mu": [0.0], "sigma": [[1.0]]}}))
    with pytest.raises(UserInputError, match="needs numpy arrays"):
        load_references(path)
    with pytest.raises(UserInputError, match="nowhere.pkl: file not found"):
        load_references(tmp_path / "nowhere.pkl")


def test_written_pickles_round_trip_and_keep_edm2s_layout(tmp_path):
    rng = np.random.default_rng(4)
    a, b, c = _stats(rng, 5), _stats(rng, 3), _stats(rng, 2)
    path = save_pickled_references(tmp_path / "ref.pkl", [
        ("inception", "inception-v3-tf-2015-12-05", a["mu"], a["sigma"]),
        ("dinov2", "dinov2-vitl14-lvd142m-random-0", b["mu"], b["sigma"]),
        ("runs/net.safetensors", "domain-net-1234", c["mu"], c["sigma"])], count=8)
    plain = pickle.loads(path.read_bytes())  # what EDM2's load_stats sees
    assert plain["num_images"] == 8 and set(plain["fid"]) == {"mu", "sigma"}
    assert plain["fd_dinov2"]["sigma"].dtype == np.float64 and "fd_net" in plain
    refs = load_references(path)
    assert [r.net for r in refs] == ["inception-v3-tf-2015-12-05", "dinov2-vitl14-lvd142m-random-0", "domain-net-1234"]
    np.testing.assert_array_equal(refs[2].sigma, c["sigma"])
    with pytest.raises(UserInputError, match="already exists"):
        save_pickled_references(path, [], count=1)
    assert fd_key("inception") == "fd_inception" and fd_key("fmnist-allconv") == "fd_fmnist-allconv"
