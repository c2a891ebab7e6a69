"""Trajectories and checkpoints on disk are untrusted: every field and file is checked."""

import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from captum_sam import SAMTracInCP, checkpoints_load_func, load_trajectory, train_sam
from captum_sam.trajectory import MANIFEST
from tests.helpers import ce_loss, make_data, mlp_model, sign_manifest


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("traj") / "run"
    train_sam(mlp_model(), make_data(n=20), ce_loss(), 2, 0.3, 0.1, 5, record_dir=out, seed=0)
    with open(os.path.join(out, MANIFEST)) as f:
        return out, json.load(f)


def rewrite(record, tmp_path, edit, sign=True):
    """A copy of the record directory whose manifest ``edit(raw)`` changed (re-signed)."""
    src, raw = record
    dst = tmp_path / "copy"
    dst.mkdir(exist_ok=True)
    for name in os.listdir(src):
        if name.endswith(".pt"):
            with open(os.path.join(src, name), "rb") as a, open(dst / name, "wb") as b:
                b.write(a.read())
    raw = json.loads(json.dumps(raw))
    edit(raw)
    if sign:  # as if the recorder had written it: the schema, not the hash, refuses it
        sign_manifest(raw)
    with open(dst / MANIFEST, "w") as f:
        json.dump(raw, f)
    return dst


def setter(path, value):
    def edit(raw):
        target = raw
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


BAD_FIELDS = [
    (("steps", 0, "lr"), -0.1, r"steps\[0\]\.lr"),
    (("steps", 0, "lr"), float("nan"), r"steps\[0\]\.lr"),
    (("steps", 0, "lr"), float("inf"), r"steps\[0\]\.lr"),
    (("steps", 0, "lr"), "0.1", r"steps\[0\]\.lr"),
    (("steps", 1, "rho"), -0.05, r"steps\[1\]\.rho"),
    (("steps", 1, "rho"), float("nan"), r"steps\[1\]\.rho"),
    (("steps", 1, "adaptive"), "false", r"steps\[1\]\.adaptive"),
    (("steps", 2, "indices"), [0, 99], r"steps\[2\]\.indices"),
    (("steps", 0), 5, r"steps\[0\]"),
    (("checkpoints", 0, "step"), -1, r"checkpoints\[0\]\.step"),
    (("checkpoints", 1, "step"), 4, r"checkpoints\[1\]\.step"),  # duplicate of [0]
    (("checkpoints", 1, "step"), 999, r"checkpoints\[1\]\.step"),
    (("checkpoints", 1, "learning_rate"), float("inf"), r"checkpoints\[1\]\.learning_rate"),
    (("checkpoints", 0, "sha256"), "abc", r"checkpoints\[0\]\.sha256"),
    (("initial", "step"), 3, r"initial\.step"),
    (("version",), 7, "field version"),
    (("n_train",), None, "field n_train"),
    (("n_train",), 0, "field n_train"),
    (("complete",), "yes", "field complete"),
    (("steps",), {}, "field steps"),
    (("optimizer", "hyperparameters", "nesterov"), "false", "hyperparameters.nesterov"),
    (("optimizer", "hyperparameters", "momentum"), "0.9", "hyperparameters.momentum"),
    (("optimizer", "hyperparameters", "weight_decay"), float("nan"), "weight_decay"),
    (("optimizer", "hyperparameters", "foreach"), 1, "hyperparameters.foreach"),
    (("optimizer", "base"), 3, "optimizer.base"),
    (("data", "sha256"), "abc", "data.sha256"),
    (("data", "n"), 21, "data.n"),
]


def test_every_edit_of_the_manifest_is_refused_unless_re_signed(record, tmp_path):
    for path, value in [
        (("steps", 0, "lr"), 0.05),  # a plausible value: only the hash can tell
        (("seed",), 1),
        (("optimizer", "hyperparameters", "weight_decay"), 0.5),
        (("steps", 3, "indices"), [0, 1, 2, 3, 4]),
    ]:
        bad = rewrite(record, tmp_path, setter(path, value), sign=False)
        with pytest.raises(ValueError, match=f"{MANIFEST}.*does not match field sha256"):
            load_trajectory(bad)
    for key in ("weight_decay", "nesterov"):  # SGD's settings the replay reads
        bad = rewrite(
            record, tmp_path, lambda raw, key=key: raw["optimizer"]["hyperparameters"].pop(key)
        )
        with pytest.raises(ValueError, match=f"optimizer.hyperparameters lacks '{key}'"):
            load_trajectory(bad)


def test_a_version_2_manifest_loads_with_a_warning(record, tmp_path):
    def as_v2(raw):
        raw["version"] = 2
        del raw["sha256"]

    old = rewrite(record, tmp_path, as_v2, sign=False)
    with pytest.warns(UserWarning, match="version 2: itself carry no SHA-256"):
        traj = load_trajectory(old)
    assert len(traj.steps) == len(record[1]["steps"])


def test_a_trajectory_is_used_only_with_its_training_set(record):
    from captum_sam import replay_trajectory

    data = make_data(n=20)  # the recorded set
    x, y = data.tensors
    other = torch.utils.data.TensorDataset(x.flip(0), y.flip(0))  # same size, other order
    traj = load_trajectory(record[0])
    assert traj.data["n"] == 20 and len(traj.data["sha256"]) == 64
    with pytest.raises(ValueError, match="`dataset` is not the training set.*data.sha256"):
        replay_trajectory(mlp_model(), other, ce_loss(), traj)
    with pytest.raises(ValueError, match="`train_dataset` is not the training set"):
        SAMTracInCP.from_trajectory(mlp_model(), other, record[0], loss_fn=ce_loss())
    with pytest.raises(ValueError, match="has 19 examples.*field n_train"):
        replay_trajectory(
            mlp_model(), torch.utils.data.TensorDataset(x[:19], y[:19]), ce_loss(), traj
        )
    loader = torch.utils.data.DataLoader(data, batch_size=7)  # the same set through a loader
    SAMTracInCP.from_trajectory(mlp_model(), loader, record[0], loss_fn=ce_loss())


@pytest.mark.parametrize("path,value,field", BAD_FIELDS)
def test_bad_manifest_values_are_refused_naming_the_field(record, tmp_path, path, value, field):
    bad = rewrite(record, tmp_path, setter(path, value))
    with pytest.raises(ValueError, match=field) as err:
        load_trajectory(bad)
    assert MANIFEST in str(err.value)


def test_zero_learning_rate_is_accepted_by_design(record, tmp_path):
    # a schedule may end at 0 (cosine annealing): such a step contributes nothing
    ok = rewrite(record, tmp_path, setter(("steps", 0, "lr"), 0.0))
    assert load_trajectory(ok).steps[0].lr == 0.0


def test_last_checkpoint_must_be_the_final_weights(record, tmp_path):
    bad = rewrite(record, tmp_path, lambda raw: raw["checkpoints"].pop())
    with pytest.raises(ValueError, match="final weights"):
        load_trajectory(bad)


def test_non_utf8_manifest_is_refused(record, tmp_path):
    bad = rewrite(record, tmp_path, lambda raw: None)
    with open(bad / MANIFEST, "wb") as f:
        f.write(b'{"format": "\xff"}')
    with pytest.raises(ValueError, match="not UTF-8"):
        load_trajectory(bad)


def test_a_changed_checkpoint_is_refused(record, tmp_path):
    copy = rewrite(record, tmp_path, lambda raw: None)
    name = record[1]["checkpoints"][0]["file"]
    state = torch.load(copy / name, weights_only=True)
    state["model_state"]["fc2.bias"] += 1.0
    torch.save(state, copy / name)
    with pytest.raises(ValueError, match=r"checkpoints\[0\]\.sha256"):
        load_trajectory(copy)
    assert load_trajectory(copy, verify=False).checkpoints[0].path.endswith(name)


def _fuzz_value(rng):
    return rng.choice(
        [None, True, False, -3, 0, 1, 7, 10**9, -0.5, 0.0, 0.3, math.inf, -math.inf, math.nan,
         "", "x", "0.1", [], [0], [0, 1], {}, {"a": 1}]
    )  # fmt: skip


def _paths(raw):
    out = [(k,) for k in raw]
    out += [("steps", t, k) for t in range(len(raw["steps"])) for k in raw["steps"][t]]
    out += [
        ("checkpoints", i, k) for i in range(len(raw["checkpoints"])) for k in raw["checkpoints"][i]
    ]
    out += [("initial", k) for k in raw["initial"]]
    return out


def test_fuzzed_manifests_load_or_raise_value_error_naming_the_field(record, tmp_path):
    rng = random.Random(0)
    _, raw = record
    paths = _paths(raw)
    for trial in range(300):
        path, value = rng.choice(paths), _fuzz_value(rng)
        bad = rewrite(record, tmp_path, setter(path, value))
        try:
            load_trajectory(bad)
        except ValueError as err:
            top = str(path[0])
            assert top in str(err) or "format" in str(err), (trial, path, value, err)
        except FileNotFoundError as err:  # a file name changed to another existing-looking one
            assert path[-1] == "file", (path, value, err)


def test_an_interrupted_run_is_refused_unless_asked(record, tmp_path):
    def interrupt(raw):  # killed after step 7, before the final checkpoint
        raw.update(complete=False)
        raw["steps"].pop()
        raw["checkpoints"].pop()

    stub = rewrite(record, tmp_path, interrupt)
    data = make_data(n=20)
    with pytest.raises(ValueError, match="field complete is false"):
        load_trajectory(stub)
    with pytest.raises(ValueError, match="field complete is false"):
        SAMTracInCP(mlp_model(), data, str(stub), loss_fn=ce_loss())
    with pytest.raises(ValueError, match="field complete is false"):
        SAMTracInCP.from_trajectory(mlp_model(), data, stub, loss_fn=ce_loss())
    with pytest.warns(UserWarning, match="incomplete"):
        est = SAMTracInCP.from_trajectory(
            mlp_model(), data, stub, loss_fn=ce_loss(), allow_incomplete=True
        )
    assert len(est.engines.terms) == len(record[1]["steps"]) - 1


TRAIN = [
    sys.executable, "-m", "captum_sam.cli", "train", "--model", "mlp", "--epochs", "200",
    "--n-train", "200", "--out",
]  # fmt: skip


def test_a_killed_train_command_leaves_a_refused_stub(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([*TRAIN, str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:  # until some steps are recorded
        try:
            with open(out / MANIFEST) as f:
                if len(json.load(f)["steps"]) >= 10:
                    break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(ValueError, match="field complete is false"):
        load_trajectory(out)
    with pytest.warns(UserWarning, match="incomplete"):
        prefix = load_trajectory(out, allow_incomplete=True)
    assert 10 <= len(prefix.steps) < 200 * 4


def test_a_decompression_bomb_is_refused_before_it_inflates(tmp_path):
    model = mlp_model()
    path = tmp_path / "bomb.pt"
    torch.save(model.state_dict(), path)
    with zipfile.ZipFile(path) as src:
        names = src.namelist()
        entries = {n: src.read(n) for n in names}
    data = next(n for n in names if "/data/" in n)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for n in names:
            if n != data:
                out.writestr(n, entries[n])
        with out.open(data, "w", force_zip64=True) as f:
            zeros = bytes(1 << 20)
            for _ in range(256):  # 256 MiB of zeros, about 250 KiB compressed
                f.write(zeros)
    assert os.path.getsize(path) < 2 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="declares .* bytes of records"):
        checkpoints_load_func(mlp_model(), str(path))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 100


def test_a_checkpoint_of_another_dtype_is_loaded_with_a_warning(tmp_path):
    model = mlp_model()  # float64
    path = tmp_path / "f32.pt"
    torch.save({k: v.float() for k, v in model.state_dict().items()}, path)
    with pytest.warns(UserWarning, match="cast"):
        checkpoints_load_func(mlp_model(), str(path))


def test_a_non_numeric_learning_rate_names_the_file(tmp_path):
    model = mlp_model()
    path = tmp_path / "lr.pt"
    torch.save({**model.state_dict(), "learning_rate": "abc"}, path)
    with pytest.raises(ValueError, match=r"lr\.pt.*learning_rate"):
        checkpoints_load_func(mlp_model(), str(path))


def test_a_new_recording_removes_a_killed_runs_temporaries_and_only_its_files(tmp_path):
    out = tmp_path / "run"
    train_sam(mlp_model(), make_data(n=10), ce_loss(), 1, 0.3, 0.1, 5, record_dir=out)
    (out / ".tmp-abc.part").write_bytes(b"partial")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        train_sam(mlp_model(), make_data(n=10), ce_loss(), 1, 0.3, 0.1, 5, record_dir=out)
    train_sam(
        mlp_model(), make_data(n=10), ce_loss(), 2, 0.3, 0.1, 5, record_dir=out, overwrite=True
    )
    assert not (out / ".tmp-abc.part").exists() and (out / "notes.txt").read_text() == "mine"
    traj = load_trajectory(out)
    files = {os.path.basename(c.path) for c in [traj.initial, *traj.checkpoints]}
    assert {f for f in os.listdir(out) if f.endswith(".pt")} == files  # no old checkpoint left
