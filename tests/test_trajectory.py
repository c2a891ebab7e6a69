import json
import os
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from captum_sam import (
    SAM,
    IndexedDataset,
    TrajectoryRecorder,
    checkpoints_load_func,
    load_trajectory,
    replay_trajectory,
    train_sam,
)
from tests.helpers import assert_unchanged, ce_loss, make_data, mlp_model, sign_manifest, snapshot


def train(tmp_path, **kw):
    model = mlp_model()
    args = dict(
        epochs=3,
        lr=0.2,
        rho=0.1,
        batch_size=7,
        weight_decay=1e-2,
        record_dir=tmp_path / "run",
        seed=3,
        momentum=0.5,
    )
    args.update(kw)
    return model, train_sam(model, make_data(n=30), ce_loss(), **args)


def test_manifest_records_every_step(tmp_path):
    model, result = train(tmp_path)
    traj = load_trajectory(result.record_dir)
    assert traj.complete and traj.n_train == 30
    assert len(traj.steps) == 3 * 5  # ceil(30 / 7) = 5 batches per epoch
    for epoch in range(3):
        seen = sorted(i for s in traj.steps if s.epoch == epoch for i in s.indices)
        assert seen == list(range(30))  # each example once per epoch
    assert {s.lr for s in traj.steps} == {0.2} and {s.rho for s in traj.steps} == {0.1}
    assert [c.step for c in traj.checkpoints] == [5, 10, 15]
    assert traj.initial.step == 0 and traj.weight_decay == 1e-2
    assert not [f for f in os.listdir(result.record_dir) if f.startswith(".tmp")]
    # the final checkpoint holds the trained weights
    fresh = mlp_model(seed=9)
    assert checkpoints_load_func(fresh, traj.final.path) == 0.2
    for p, q in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_training_is_deterministic_for_a_seed(tmp_path):
    a, _ = train(tmp_path / "a")
    b, _ = train(tmp_path / "b")
    c, _ = train(tmp_path / "c", seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_replay_reproduces_final_weights(tmp_path):
    model, result = train(tmp_path, lr_schedule=lambda e: 0.5**e, save_every=4)
    traj = load_trajectory(result.record_dir)
    assert [s.lr for s in traj.steps][::5] == [0.2, 0.1, 0.05]
    template = mlp_model(seed=11)
    before = snapshot(template)
    replayed = replay_trajectory(template, make_data(n=30), ce_loss(), result.record_dir)
    assert_unchanged(template, before)
    for p, q in zip(replayed.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_replay_without_examples_matches_hand_written_loop(tmp_path):
    _, result = train(tmp_path, epochs=2, momentum=0.0)
    traj = load_trajectory(result.record_dir)
    data = make_data(n=30)
    removed = [0, 4, 17]
    got = replay_trajectory(mlp_model(), data, ce_loss(), traj, remove=removed, renormalise=False)
    # reference: plain SAM-SGD written out, removed examples weighted 0, 1/|B_t| kept
    ref = mlp_model()
    checkpoints_load_func(ref, traj.initial.path)
    params = list(ref.parameters())
    x, y = data.tensors
    for step in traj.steps:
        idx = torch.tensor([i for i in step.indices if i not in removed])
        size = len(step.indices)

        def loss_at(ps, idx=idx, size=size):
            out = torch.func.functional_call(
                ref, dict(zip([n for n, _ in ref.named_parameters()], ps)), (x[idx],)
            )
            return ce_loss()(out, y[idx]).sum() / size

        g = torch.autograd.grad(loss_at(params), params)
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        perturbed = [p + step.rho * gi / (norm + 1e-12) for p, gi in zip(params, g)]
        g2 = torch.autograd.grad(loss_at(perturbed), perturbed)
        with torch.no_grad():
            for p, gi in zip(params, g2):
                p.sub_(step.lr * (gi + traj.weight_decay * p))
    for p, q in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_recorder_in_custom_loop_with_indexed_dataset(tmp_path):
    data = make_data(n=20)
    model = mlp_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    rec = TrajectoryRecorder(tmp_path / "r", model, opt, n_train=len(data), save_every=2)
    rec.start()
    loader = DataLoader(
        IndexedDataset(data), batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    seen = []
    for idx, x, y in loader:
        ce_loss()(model(x), y).mean().backward()
        opt.first_step(zero_grad=True)
        ce_loss()(model(x), y).mean().backward()
        opt.second_step(zero_grad=True)
        rec.record_step(idx, epoch=0)
        seen.append(idx.tolist())
    rec.finish()
    traj = load_trajectory(tmp_path / "r")
    assert [list(s.indices) for s in traj.steps] == seen
    assert [c.step for c in traj.checkpoints] == [2, 4]
    with pytest.raises(FileExistsError, match="overwrite"):
        TrajectoryRecorder(tmp_path / "r", model, opt, n_train=len(data))
    with pytest.raises(ValueError, match="IndexedDataset"):
        rec.record_step(None)
    with pytest.raises(ValueError, match=r"\[0, 20\)"):
        rec.record_step([3, 25])


def test_second_recorder_taking_over_a_directory_stops_the_first(tmp_path):
    data = make_data(n=12)
    model = mlp_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    first = TrajectoryRecorder(tmp_path / "r", model, opt, n_train=len(data))
    first.start()
    first.record_step([0, 1, 2])
    first.save_checkpoint()
    second = TrajectoryRecorder(tmp_path / "r", model, opt, n_train=len(data), overwrite=True)
    second.start()
    second.record_step([3, 4])
    first.record_step([5, 6])
    with pytest.raises(RuntimeError, match=f"taken over.*run {second.run}'s.*run {first.run}"):
        first.save_checkpoint()
    with pytest.raises(RuntimeError, match="taken over"):
        first.finish()
    second.finish()
    traj = load_trajectory(tmp_path / "r")  # the second run's record, whole and verified
    assert [list(s.indices) for s in traj.steps] == [[3, 4]]
    assert not os.path.exists(tmp_path / "r" / ".lock")
    third = TrajectoryRecorder(tmp_path / "s", model, opt, n_train=len(data))
    with open(tmp_path / "s" / "manifest.json", "w") as f:
        f.write("{}")  # someone else's manifest appears before start()
    with pytest.raises(RuntimeError, match="taken over"):
        third.start()


class Boom:
    """Pickled payload whose unpickling would run code."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/captum_sam_pwned",))


def test_checkpoint_is_loaded_without_running_pickle_code(tmp_path):
    target = "/tmp/captum_sam_pwned"
    if os.path.exists(target):
        os.remove(target)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model_state": Boom(), "learning_rate": 1.0}, f)
    with pytest.raises(ValueError, match="weights_only"):
        checkpoints_load_func(mlp_model(), str(path))
    assert not os.path.exists(target)
    # the payload is live: a plain unpickler would have run it
    with open(path, "rb") as f:
        pickle.load(f)
    assert os.path.exists(target)
    os.remove(target)


def test_manifest_cannot_name_files_outside_its_directory(tmp_path):
    _, result = train(tmp_path, epochs=1)
    manifest = os.path.join(result.record_dir, "manifest.json")
    raw = json.load(open(manifest))
    outside = tmp_path / "outside.pt"
    torch.save({"model_state": {}, "learning_rate": 1.0}, outside)
    for bad in ["../outside.pt", str(outside)]:
        raw["checkpoints"][0]["file"] = bad
        json.dump(sign_manifest(raw), open(manifest, "w"))
        with pytest.raises(ValueError, match="outside the record directory"):
            load_trajectory(result.record_dir)


def test_missing_files_and_fields_are_named(tmp_path):
    _, result = train(tmp_path, epochs=1)
    manifest = os.path.join(result.record_dir, "manifest.json")
    raw = json.load(open(manifest))
    os.remove(os.path.join(result.record_dir, raw["checkpoints"][0]["file"]))
    with pytest.raises(FileNotFoundError, match=r"checkpoints\[0\]"):
        load_trajectory(result.record_dir)
    del raw["steps"][0]["lr"]
    json.dump(sign_manifest(raw), open(manifest, "w"))
    with pytest.raises(ValueError, match=r"field steps\[0\] lacks 'lr'"):
        load_trajectory(result.record_dir)
    del raw["steps"]
    json.dump(sign_manifest(raw), open(manifest, "w"))
    with pytest.raises(ValueError, match="'steps'"):
        load_trajectory(result.record_dir)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_trajectory(tmp_path)
    no_lr = tmp_path / "no_lr.pt"
    torch.save({"model_state": mlp_model().state_dict()}, no_lr)
    with pytest.raises(ValueError, match="'learning_rate'"):
        checkpoints_load_func(mlp_model(), str(no_lr))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoints_load_func(mlp_model(), str(tmp_path / "nope.pt"))


class Stream(IterableDataset):
    def __iter__(self):
        yield from zip(*make_data(n=5).tensors)


def test_train_sam_rejects_bad_input(tmp_path):
    data = make_data(n=10)
    with pytest.raises(ValueError, match="rho"):
        train_sam(mlp_model(), data, ce_loss(), 1, 0.1, -0.5, 4)
    with pytest.raises(ValueError, match="empty"):
        train_sam(
            mlp_model(),
            torch.utils.data.TensorDataset(torch.zeros(0, 5)),
            ce_loss(),
            1,
            0.1,
            0.1,
            4,
        )
    with pytest.raises(TypeError, match="map-style"):
        train_sam(mlp_model(), Stream(), ce_loss(), 1, 0.1, 0.1, 4)
    with pytest.raises(ValueError, match="reduction='none'"):
        train_sam(mlp_model(), data, torch.nn.CrossEntropyLoss(), 1, 0.1, 0.1, 4)
    with pytest.raises(ValueError, match="batch_size"):
        train_sam(mlp_model(), data, ce_loss(), 1, 0.1, 0.1, 0)
