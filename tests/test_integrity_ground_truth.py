"""GroundTruth's cache: hashed rows, checked schema, complete keys, locked writers."""

import json
import os
import re
import threading
import warnings

import pytest
import torch

from captum_sam import load_trajectory, replay_trajectory, train_sam
from captum_sam.core.files import DirectoryLock, sha256_file
from captum_sam.evaluation import truth_cache as gt_module
from captum_sam.evaluation.ground_truth import GroundTruth
from tests.helpers import assert_unchanged, ce_loss, linear_model, make_data, mlp_model, snapshot

RHO, LAM = 0.1, 0.1
TEST = make_data(n=6, seed=1).tensors


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    """A short recorded run (4 SAM steps): replaying it is the cheap retraining used here."""
    out = tmp_path_factory.mktemp("record") / "r"
    train_sam(mlp_model(), make_data(n=16), ce_loss(), 1, 0.2, RHO, 4, record_dir=out)
    return load_trajectory(out)


def truth(record, cache, loss=None):
    loss = ce_loss() if loss is None else loss
    return GroundTruth(
        mlp_model(), make_data(n=16), loss, "schedule", trajectory=record, cache_dir=cache
    )


def fixed_point_truth(start, cache, loss):
    return GroundTruth(
        start,
        make_data(n=8),
        loss,
        "fixed_point",
        rho=RHO,
        weight_decay=LAM,
        tol=1e-6,
        cache_dir=cache,
    )


def key_dir(cache):
    (name,) = [n for n in os.listdir(cache) if os.path.isdir(os.path.join(cache, n))]
    return os.path.join(cache, name)


def row_path(cache, removed):
    return os.path.join(key_dir(cache), gt_module._row_name(gt_module._removal_key(removed)))


def manifest(cache):
    with open(os.path.join(key_dir(cache), "manifest.json")) as f:
        return json.load(f)


def files(cache):
    out = {}
    for root, _, names in os.walk(cache):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.join(root, name)] = f.read()
    return out


def no_retraining(monkeypatch):
    monkeypatch.setattr(GroundTruth, "retrain", lambda self, removed: pytest.fail("retrained"))


def same(a, b):
    torch.testing.assert_close(a.losses, b.losses, rtol=0, atol=0)
    torch.testing.assert_close(a.params, b.params, rtol=0, atol=0)
    assert torch.equal(a.accuracies, b.accuracies)


# ----------------------------------------------------------------------- edited rows


def test_an_edited_row_is_refused_naming_the_file_and_sha256(record, tmp_path):
    cache = str(tmp_path / "cache")
    truth(record, cache).evaluate([[1], [2]], TEST)
    path = row_path(cache, [1])
    row = torch.load(path, weights_only=True)
    row["losses"].zero_()
    row["accuracy"] = torch.tensor(1.0, dtype=torch.float64)
    torch.save(row, path)
    before = files(cache)
    for gt in (truth(record, cache), truth(record, cache)):
        model = snapshot(gt.model)
        with pytest.raises(ValueError, match=re.escape(repr(path)) + r": 'sha256' is [0-9a-f]{64}"):
            gt.evaluate([[2], [1]], TEST)
        assert_unchanged(gt.model, model)
    assert files(cache) == before  # the edited file is kept as evidence, nothing rewritten


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(losses=r["losses"][:3]), r"'losses' shape is \(3,\), expected \(6,\)"),
        (lambda r: r.update(params=r["params"].float()), "'params' dtype is torch.float32"),
        (lambda r: r.pop("seconds"), r"fields are \['accuracy', 'losses', 'params'\]"),
        (lambda r: r.update(accuracy=torch.tensor(1.5).double()), "'accuracy' is 1.5"),
        (lambda r: r.update(losses=r["losses"].tolist()), "'losses' is a list, not a tensor"),
    ],
)
def test_a_row_with_the_wrong_schema_is_refused_even_with_a_matching_hash(
    record, tmp_path, edit, message
):
    cache = str(tmp_path / "cache")
    truth(record, cache).evaluate([[1]], TEST)
    path = row_path(cache, [1])
    row = torch.load(path, weights_only=True)
    edit(row)
    torch.save(row, path)
    entries = manifest(cache)
    (entry,) = entries["rows"].values()
    entry["sha256"] = sha256_file(path)  # as if a writer of another version recorded it
    with open(os.path.join(key_dir(cache), "manifest.json"), "w") as f:
        json.dump(entries, f)
    before = files(cache)
    with pytest.raises(ValueError, match=re.escape(repr(path)) + ": " + message):
        truth(record, cache).evaluate([[1]], TEST)
    assert files(cache) == before


# ----------------------------------------------------------------------- untrusted rows


def test_unlisted_rows_and_old_flat_files_are_recomputed_never_served(record, tmp_path):
    cache = str(tmp_path / "cache")
    res = truth(record, cache).evaluate([[1], [2]], TEST)
    path = row_path(cache, [1])
    row = torch.load(path, weights_only=True)
    row["losses"].zero_()
    torch.save(row, path)
    entries = manifest(cache)
    del entries["rows"][gt_module._removal_key([1])]  # as if written without a manifest entry
    with open(os.path.join(key_dir(cache), "manifest.json"), "w") as f:
        json.dump(entries, f)
    old = os.path.join(cache, "schedule-" + "a" * 20 + "-" + "b" * 12 + "-" + "c" * 16 + ".pt")
    torch.save({"losses": torch.zeros(6)}, old)
    old_bytes = files(cache)[old]
    with pytest.warns(UserWarning) as caught:
        again = truth(record, cache).evaluate([[1], [2]], TEST)
    texts = [str(w.message) for w in caught]
    assert any(repr(path) in t and "not recorded in the manifest" in t for t in texts), texts
    assert any("older version without a manifest" in t and "'schedule-aaa" in t for t in texts)
    same(again, res)
    assert manifest(cache)["rows"][gt_module._removal_key([1])]["sha256"] == sha256_file(path)
    assert files(cache)[old] == old_bytes  # the user's old files are left alone


def test_a_truncated_row_is_recomputed_with_a_warning_naming_it(record, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    res = truth(record, cache).evaluate([[1], [2]], TEST)
    path, other = row_path(cache, [1]), row_path(cache, [2])
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    other_bytes = files(cache)[other]
    with pytest.warns(UserWarning, match=re.escape(repr(path)) + ".*it is recomputed"):
        again = truth(record, cache).evaluate([[1], [2]], TEST)
    same(again, res)
    assert files(cache)[other] == other_bytes
    assert manifest(cache)["rows"][gt_module._removal_key([1])]["sha256"] == sha256_file(path)
    no_retraining(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same(truth(record, cache).evaluate([[1], [2]], TEST), res)


def test_manifest_problems(record, tmp_path):
    cache = str(tmp_path / "cache")
    res = truth(record, cache).evaluate([[1]], TEST)
    path = os.path.join(key_dir(cache), "manifest.json")
    with open(path, "w") as f:
        f.write('{"format": "captum_sam.ground_truth", "rows": {')  # truncated
    with pytest.warns(UserWarning) as caught:
        same(truth(record, cache).evaluate([[1]], TEST), res)
    (only,) = [str(w.message) for w in caught]  # one warning, not one per row as well
    assert re.search(
        re.escape(repr(path)) + " is not valid JSON.*every row of it is recomputed", only
    )
    entries = manifest(cache)
    assert list(entries["rows"]) == [gt_module._removal_key([1])]
    entries["fields"]["loss"] = "torch.nn.modules.loss.MSELoss:0"
    with open(path, "w") as f:
        json.dump(entries, f)
    before = files(cache)
    with pytest.raises(ValueError, match=re.escape(repr(path)) + ": field 'fields.loss'"):
        truth(record, cache).evaluate([[1], [2]], TEST)
    entries["key"] = "0" * 64
    with open(path, "w") as f:
        json.dump(entries, f)
    with pytest.raises(ValueError, match=re.escape(repr(path)) + ": field 'key' is '0000"):
        truth(record, cache).evaluate([[1]], TEST)
    assert {k: v for k, v in files(cache).items() if k != path} == {
        k: v for k, v in before.items() if k != path
    }


# ----------------------------------------------------------------------- complete keys


def as_version_1(record):
    """Rewrite a record's manifest as version 1 (no checkpoint hashes); its bytes."""
    path = record / "manifest.json"
    raw = json.loads(path.read_text())
    raw["version"] = 1
    raw.pop("sha256")  # version 1 hashes neither itself
    raw.pop("data")  # nor records the data
    raw.pop("run")  # nor the run that wrote it
    for entry in [raw["initial"], *raw["checkpoints"]]:
        entry.pop("sha256")
    path.write_text(json.dumps(raw))
    return path.read_bytes()


def schedule_truth(record, cache):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # version 1: "cannot be verified"
        traj = load_trajectory(record)
    data = make_data(n=12)
    return GroundTruth(mlp_model(), data, ce_loss(), "schedule", trajectory=traj, cache_dir=cache)


def test_a_re_recorded_initial_checkpoint_gives_a_new_key(tmp_path, monkeypatch):
    data, record, cache = make_data(n=12), tmp_path / "r", str(tmp_path / "cache")
    args = dict(epochs=2, lr=0.2, rho=RHO, batch_size=4, seed=0, record_dir=record)
    train_sam(mlp_model(seed=0), data, ce_loss(), **args)
    first_manifest = as_version_1(record)
    held = schedule_truth(record, cache)
    stale = held.evaluate([[3]], TEST)
    train_sam(mlp_model(seed=1), data, ce_loss(), **args, overwrite=True)  # other w_0 only
    assert as_version_1(record) == first_manifest  # the manifest cannot tell the runs apart
    replayed = replay_trajectory(
        mlp_model(), data, ce_loss(), load_trajectory(record, verify=False), remove=[3]
    )
    expected = torch.cat([p.detach().reshape(-1) for p in replayed.parameters()])
    assert not torch.allclose(expected, stale.params[0])
    fresh = schedule_truth(record, cache)
    for gt in (fresh, held):  # a new instance, and one built before the re-recording
        torch.testing.assert_close(gt.evaluate([[3]], TEST).params[0], expected, rtol=0, atol=0)
    assert len(os.listdir(cache)) == 2
    no_retraining(monkeypatch)
    torch.testing.assert_close(fresh.evaluate([[3]], TEST).params[0], expected, rtol=0, atol=0)


def test_the_key_covers_loss_settings_and_start_weights(tmp_path, monkeypatch):
    cache, calls, retrain = str(tmp_path / "cache"), [], GroundTruth.retrain
    monkeypatch.setattr(GroundTruth, "retrain", lambda s, r: calls.append(r) or retrain(s, r))
    start, ce = linear_model(), ce_loss()
    plain = fixed_point_truth(start, cache, ce).evaluate([[1]], TEST)
    smooth = torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=0.3)
    other = fixed_point_truth(start, cache, smooth).evaluate([[1]], TEST)
    assert not torch.allclose(other.params, plain.params)  # same repr, other loss
    fixed_point_truth(linear_model(seed=4), cache, ce).evaluate([[1]], TEST)  # other start
    assert len(calls) == 3 and len(os.listdir(cache)) == 3
    # the same inputs, in new objects, hit the cache
    same(fixed_point_truth(linear_model(), cache, ce_loss()).evaluate([[1]], TEST), plain)
    assert len(calls) == 3


def test_the_key_covers_which_parameters_train(tmp_path, monkeypatch):
    cache, calls, retrain = str(tmp_path / "cache"), [], GroundTruth.retrain
    monkeypatch.setattr(GroundTruth, "retrain", lambda s, r: calls.append(r) or retrain(s, r))
    ce = ce_loss()
    plain = fixed_point_truth(linear_model(), cache, ce).evaluate([[1]], TEST)
    frozen_model = linear_model()
    bias = [p for n, p in frozen_model.named_parameters() if n.endswith("bias")][0]
    bias.requires_grad_(False)  # the same weights and repr, the bias not trained
    frozen = fixed_point_truth(frozen_model, cache, ce).evaluate([[1]], TEST)
    assert len(calls) == 2  # not served from the unfrozen model's row
    fresh = fixed_point_truth(frozen_model, None, ce).evaluate([[1]], TEST)
    same(frozen, fresh)
    assert not torch.allclose(frozen.params, plain.params)


# ----------------------------------------------------------------------- writers


def test_concurrent_writers_keep_each_others_rows(record, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    writer_a, writer_b = truth(record, cache), truth(record, cache)
    retrain, stored = writer_a.retrain, {}

    def interleaved(removed):
        writer_b.evaluate([[1], [2], [3]], TEST)  # B commits while A is still retraining [1]
        stored["b"] = files(cache)[row_path(cache, [1])]
        return retrain(removed)

    writer_a.retrain = interleaved
    res_a = writer_a.evaluate([[1], [4]], TEST)
    rows = manifest(cache)["rows"]
    assert sorted(rows) == sorted(gt_module._removal_key([i]) for i in (1, 2, 3, 4))
    for entry in rows.values():
        assert entry["sha256"] == sha256_file(os.path.join(key_dir(cache), entry["file"]))
    assert files(cache)[row_path(cache, [1])] == stored["b"]  # B's listed row is not replaced
    assert not [n for n in os.listdir(key_dir(cache)) if n.startswith(".")]  # no lock, no .part
    no_retraining(monkeypatch)
    got = truth(record, cache).evaluate([[1], [2], [3], [4]], TEST)
    torch.testing.assert_close(got.losses[[0, 3]], res_a.losses, rtol=0, atol=0)


def test_a_held_lock_is_waited_for_then_refused_naming_it(record, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    truth(record, cache).evaluate([[1]], TEST)
    directory = key_dir(cache)
    before = files(cache)
    monkeypatch.setattr(gt_module, "LOCK_TIMEOUT", 0.3)
    with DirectoryLock(directory, "another writer"):
        with pytest.raises(ValueError, match=re.escape(os.path.join(directory, ".lock"))):
            truth(record, cache).evaluate([[2]], TEST)
        assert {k: v for k, v in files(cache).items() if not k.endswith(".lock")} == before
    monkeypatch.setattr(gt_module, "LOCK_TIMEOUT", 10.0)
    lock = DirectoryLock(directory, "another writer").__enter__()
    threading.Timer(0.3, lock.__exit__, (None, None, None)).start()
    truth(record, cache).evaluate([[2]], TEST)  # waits for the other writer, then writes
    assert gt_module._removal_key([2]) in manifest(cache)["rows"]
