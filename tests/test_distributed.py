"""Multi-process attribution on torch.distributed (gloo, CPU) equals one process."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from captum_sam import checkpoints_load_func, load_trajectory, train_sam
from captum_sam.applications import influence_scores
from captum_sam.gif import checkpoint_form
from captum_sam.gif.tracincp import SAMTracInCP
from captum_sam.hif import kfac as kfac_module
from captum_sam.hif import sides, site_groups
from captum_sam.hif.influence import SAMInfluenceFunction
from tests.helpers import DTYPE, BatchCentred, ce_loss, make_data, mlp_model, save_checkpoint


def per_batch_rate(model, path):
    """The recorded run's checkpoint weight for a checkpoint-form edit: eta/|B| (|B| = 5)."""
    return checkpoints_load_func(model, path) / 5


def compute(run_dir):
    """Everything the test compares, computed the same way in every process."""
    data = torch.load(os.path.join(run_dir, "data.pt"))
    train, test = TensorDataset(*data["train"]), data["test"]
    model = mlp_model()
    ckpts = [c.path for c in load_trajectory(run_dir).checkpoints]
    out = {}
    # 2 batches: with 3 processes one rank has none, yet all must agree on the path
    centred = BatchCentred().to(DTYPE)
    few = TensorDataset(*(t[:8] for t in train.tensors))
    out["centred_self"] = SAMTracInCP(
        centred, few, [os.path.join(run_dir, "centred.pt")], loss_fn=ce_loss(), batch_size=4
    ).self_influence()
    for factorize in (True, False):  # merged two-pass path / vmap path, fresh estimators
        fresh = SAMTracInCP(
            model, train, ckpts, loss_fn=ce_loss(), batch_size=4, rho=0.1, factorize=factorize
        )
        out[f"gif_self_fresh_{factorize}"] = fresh.self_influence()
    # merged self influence with nothing kept (every rank recomputes in the second pass)
    saved = checkpoint_form.MERGE_BUDGET_BYTES
    checkpoint_form.MERGE_BUDGET_BYTES = 1
    try:
        out["gif_self_unkept"] = SAMTracInCP(
            model, train, ckpts, loss_fn=ce_loss(), batch_size=4, rho=0.1
        ).self_influence()
    finally:
        checkpoint_form.MERGE_BUDGET_BYTES = saved
    # only the output layer perturbed: factors at w kept by batch index on each rank
    for call in ("self", "influence"):
        head = SAMTracInCP(model, train, ckpts, loss_fn=ce_loss(), batch_size=4, rho=0.1,
                           layers=["fc2"], perturbation_scope="attributed")  # fmt: skip
        out[f"head_{call}"] = head.self_influence() if call == "self" else head.influence(test)
    # the output layer attributed, every layer perturbed: the perturbation's gradient in
    # the other layers summed (all-reduced) from the first pass of merged self influence
    for factorize in (True, False):
        out[f"layer_self_{factorize}"] = SAMTracInCP(
            model, train, ckpts, loss_fn=ce_loss(), batch_size=4, rho=0.1, layers=["fc2"],
            factorize=factorize,
        ).self_influence()  # fmt: skip
    gif = SAMTracInCP(model, train, ckpts, loss_fn=ce_loss(), batch_size=4, rho=0.1)
    out["gif"] = gif.influence(test)
    out["gif_top"] = gif.influence(test, k=3, proponents=False).indices
    out["gif_self"] = gif.self_influence()
    out["gif_scores"] = influence_scores(gif, test)
    out["gif_train_q"] = gif.compute_intermediate_quantities()
    out["gif_change"] = SAMTracInCP(model, train, ckpts, loss_fn=ce_loss(), batch_size=4,
                                    rho=0.1, checkpoints_load_func=per_batch_rate,  # eta/|B|
                                    ).parameter_change([1, 5, 9, 13, 17], flat=True)  # fmt: skip
    traj = SAMTracInCP.from_trajectory(
        model, train, run_dir, loss_fn=ce_loss(), perturbation="dataset"
    )
    out["traj"] = traj.influence(test)
    out["traj_self"] = traj.self_influence()
    out["traj_change"] = traj.parameter_change([2, 3, 11], flat=True)
    centred_hif = SAMInfluenceFunction(  # factored GGN refused on every rank, collectively
        centred,
        few,
        os.path.join(run_dir, "centred.pt"),
        loss_fn=ce_loss(),
        batch_size=4,
        damping=0.1,
        variant="fast",
        projection_dim=None,  # the exact inverse: no rank cap,
        hessian_reg=0.0,  # no added regulariser,
        hessian_inverse_tol=None,  # no eigenvalue dropped
        curvature="ggn",
        solver="dense",
    )
    out["centred_hif"] = centred_hif.influence(test)
    out["centred_hif_factored"] = torch.tensor(float(centred_hif.operator._ggn_checked))
    for solver, factorize in [("dense", True), ("dense", False), ("gmres", True)]:
        name = solver if factorize else f"{solver}_products"
        hif = SAMInfluenceFunction(
            model,
            train,
            run_dir,
            loss_fn=ce_loss(),
            batch_size=4,
            rho=0.1,
            weight_decay=1e-2,
            damping=1e-2,
            variant="exact",
            projection_dim=None,  # the exact inverse: no rank cap,
            hessian_reg=0.0,  # no added regulariser,
            hessian_inverse_tol=None,  # no eigenvalue dropped
            curvature="ggn",
            solver=solver,
            solver_options={"tol": 1e-10},
            factorize=factorize,
        )
        out[f"hif_{name}"] = hif.influence(test)
        out[f"hif_{name}_scores"] = influence_scores(hif, test)
        out[f"hif_{name}_change"] = hif.parameter_change([0, 4, 7], flat=True)
        if solver == "dense":  # iterative self influence: one solve per example, slow
            out[f"hif_{name}_self"] = hif.self_influence()
            out[f"hif_{name}_top"] = hif.influence(test, k=2).indices
            out[f"hif_{name}_factored"] = torch.tensor(float(bool(hif.operator._ggn_checked)))
    for curvature, variant in [("ekfac", "fast"), ("kfac", "full")]:  # factors summed over ranks
        kfac = SAMInfluenceFunction(
            model, train, run_dir, loss_fn=ce_loss(), batch_size=4, rho=0.1, damping=None,
            variant=variant, curvature=curvature, projection_dim=None, hessian_reg=0.0,
            hessian_inverse_tol=None, solver_options={"tol": 1e-11},
        )  # fmt: skip
        out[f"{curvature}_{variant}"] = kfac.influence(test)
        out[f"{curvature}_{variant}_damping"] = torch.tensor(list(kfac.damping_used.values()))
        sampled = SAMInfluenceFunction(
            model, train, run_dir, loss_fn=ce_loss(), batch_size=4, rho=0.1, damping=None,
            variant=variant, curvature=curvature, projection_dim=None, hessian_reg=0.0,
            hessian_inverse_tol=None, solver_options={"tol": 1e-11}, kfac_samples=1, seed=3,
        )  # fmt: skip
        out[f"{curvature}_{variant}_sampled"] = sampled.influence(test)  # the same signs
    # fewer curvature rows (5, sharded 4 + 1 or 4 + 1 + 0) than fc1's inputs (6): a thin
    # input basis from the rows of every rank equals eigendecomposing the summed A
    few = TensorDataset(*(t[:5] for t in train.tensors))
    for thin in (False, True):
        saved = kfac_module._THIN_MIN_WIDTH, kfac_module._THIN_ROWS
        if thin:
            kfac_module._THIN_MIN_WIDTH, kfac_module._THIN_ROWS = 1, 1.0
        try:
            est = SAMInfluenceFunction(
                model, train, run_dir, loss_fn=ce_loss(), batch_size=4, rho=0.1,
                damping=None, variant="fast", curvature="ekfac", projection_dim=None,
                hessian_reg=0.0, hessian_inverse_tol=None, hessian_dataset=few,
            )  # fmt: skip
        finally:
            kfac_module._THIN_MIN_WIDTH, kfac_module._THIN_ROWS = saved
        out[f"ekfac_few_{thin}"] = est.influence(test)
        qa = est.operator.kronecker["perturbed"].qa
        out[f"ekfac_few_{thin}_k"] = torch.tensor([q.shape[1] for q in qa])
    # over the test-row budget, EK-FAC scores a group of layers per pass
    budget = sides.TEST_BUDGET_BYTES
    sides.TEST_BUDGET_BYTES = kfac.operator.dim * len(test[1]) * 8 // 2
    try:
        plan = site_groups.plan(kfac, test, sides.TEST_BUDGET_BYTES)
        out["kfac_full_groups"] = torch.tensor(len(plan or []))
        kfac = SAMInfluenceFunction(
            model, train, run_dir, loss_fn=ce_loss(), batch_size=4, rho=0.1, damping=None,
            variant="fast", curvature="ekfac", projection_dim=None, hessian_reg=0.0,
            hessian_inverse_tol=None,
        )  # fmt: skip
        plan = site_groups.plan(kfac, test, sides.TEST_BUDGET_BYTES)
        out["ekfac_fast_groups"] = torch.tensor(len(plan or []))
        out["ekfac_fast_by_layers"] = kfac.influence(test)
        out["ekfac_fast_by_layers_top"] = kfac.influence(test, k=2).indices
    finally:
        sides.TEST_BUDGET_BYTES = budget
    return out


def worker(rank, world, store, run_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.save(compute(run_dir), os.path.join(run_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank tears down while another still communicates
    dist.destroy_process_group()
    # skip interpreter finalisation, where gloo's worker threads can abort a process
    # that has already finished its work (a known torch teardown issue)
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_results_equal_single_process(tmp_path, world):
    data = make_data(n=30, seed=9)
    x, y = data.tensors
    train = TensorDataset(x[:22], y[:22])  # 6 batches of 4: uneven shards
    model = mlp_model()
    train_sam(
        model,
        train,
        ce_loss(),
        epochs=2,
        lr=0.3,
        rho=0.1,
        batch_size=5,
        record_dir=tmp_path,
        seed=0,
        overwrite=True,
    )
    torch.save({"train": (x[:22], y[:22]), "test": (x[22:], y[22:])}, tmp_path / "data.pt")
    torch.manual_seed(0)
    save_checkpoint(BatchCentred().to(DTYPE), tmp_path / "centred.pt")
    single = compute(str(tmp_path))
    torch.testing.assert_close(single["gif_self_fresh_True"], single["gif_self_fresh_False"])
    torch.testing.assert_close(single["gif_self_fresh_True"], single["gif_self"])
    torch.testing.assert_close(single["gif_self_unkept"], single["gif_self"])
    torch.testing.assert_close(single["layer_self_True"], single["layer_self_False"])
    assert single["hif_dense_factored"] == 1 and single["hif_dense_products_factored"] == 0
    assert single["centred_hif_factored"] == 0
    assert single["kfac_full_groups"] == 0 and single["ekfac_fast_groups"] >= 2
    torch.testing.assert_close(single["ekfac_fast_by_layers"], single["ekfac_fast"])
    for key in ("ekfac_fast", "kfac_full"):  # sampled pseudo-gradients: other scores
        assert not torch.allclose(single[f"{key}_sampled"], single[key], rtol=1e-3)
    assert single["ekfac_few_True_k"].tolist() == [5, 5]
    assert single["ekfac_few_False_k"].tolist() == [6, 5]
    torch.testing.assert_close(single["ekfac_few_True"], single["ekfac_few_False"])
    for key in ("", "_scores", "_change", "_self"):
        torch.testing.assert_close(single[f"hif_dense{key}"], single[f"hif_dense_products{key}"])
    mp.spawn(worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got) == set(single)
        for key, value in single.items():
            if value.dtype == torch.long:
                assert torch.equal(got[key], value), (rank, key)
            else:
                # sampled factors are near-degenerate: their eigenvectors feel the ranks'
                # summation order at 1e-9 (other signs would differ by about 25%)
                tol = 1e-7 if key.endswith("_sampled") else 1e-9
                torch.testing.assert_close(
                    got[key], value, rtol=tol, atol=tol / 100, msg=f"rank {rank}: {key}"
                )


def test_nccl_reduces_cpu_tensors_through_the_cuda_device(monkeypatch):
    """NCCL cannot reduce CPU tensors: counts and flags travel through the GPU."""
    from captum_sam.core import distributed

    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    cpu = torch.tensor([2.0], dtype=torch.float64)
    assert distributed._collective_device(cpu) == torch.device("cuda", 1)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert distributed._collective_device(cpu) is None

    # the move and copy-back, with a stand-in device and a stand-in reduction
    seen = []

    def fake_all_reduce(t, op):
        seen.append(t)
        t.mul_(3)  # as if three ranks held the same value

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "_collective_device", lambda t: torch.device("cpu"))
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    out = distributed.all_reduce_sum(cpu)
    assert out is cpu and float(cpu[0]) == 6.0 and seen[0] is not cpu


def join_group(rank, world, store):
    """One process of a 2-rank gloo group that fails within 60 s instead of hanging."""
    import datetime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    return torch.load(os.path.join(os.path.dirname(store), "data.pt"))["train"]


def leave_group(run_dir, name, rank, errors):
    """Save this rank's caught errors, meet the others and exit (see ``worker``)."""
    torch.save(errors, os.path.join(run_dir, f"{name}{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def spawn_two(tmp_path, worker, name):
    """Run ``worker`` on 2 ranks over a 22-example set; each rank's caught errors."""
    torch.save({"train": make_data(n=22, seed=9).tensors}, tmp_path / "data.pt")
    save_checkpoint(mlp_model(), tmp_path / "c.pt")
    mp.spawn(worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"{name}{rank}.pt") for rank in range(2)]


def disagreeing_worker(rank, world, store, run_dir):
    """Rank 1 is given other data: every rank must refuse, none may hang or mix."""
    x, y = join_group(rank, world, store)
    errors = {}
    short = TensorDataset(x[: 22 - rank], y[: 22 - rank])  # another size on rank 1
    try:
        SAMTracInCP(mlp_model(), short, [os.path.join(run_dir, "c.pt")], loss_fn=ce_loss())
    except ValueError as err:
        errors["size"] = str(err)
    other = TensorDataset(x, (y + rank) % 3)  # other labels on rank 1
    est = SAMInfluenceFunction(mlp_model(), other, os.path.join(run_dir, "c.pt"),
                               loss_fn=ce_loss(), batch_size=4, rho=0.1, projection_dim=None,
                               hessian_reg=0.0, hessian_inverse_tol=None)  # fmt: skip
    try:
        est.save_intermediate_quantities(os.path.join(run_dir, "cache"))
    except ValueError as err:
        errors["cache"] = str(err)
    try:
        SAMInfluenceFunction(mlp_model(), other, os.path.join(run_dir, "c.pt"),
                             loss_fn=ce_loss(), batch_size=4, rho=0.1, curvature="kfac",
                             factors_dir=os.path.join(run_dir, "factors"))  # fmt: skip
    except ValueError as err:
        errors["factors"] = str(err)
    leave_group(run_dir, "errors", rank, errors)


@pytest.mark.slow
def test_ranks_given_different_data_all_refuse(tmp_path):
    for errors in spawn_two(tmp_path, disagreeing_worker, "errors"):
        assert "disagree on the size of `train_dataset`" in errors["size"]
        assert "rank 0: 22, rank 1: 21" in errors["size"]
        assert "disagree on the fingerprint of quantity cache" in errors["cache"]
        assert "data" in errors["cache"]  # the field that differs
        assert "disagree on the fingerprint of the K-FAC factors" in errors["factors"]
    assert not os.path.exists(tmp_path / "cache" / "manifest.json")  # nothing to reuse later


def locked_cache_worker(rank, world, store, run_dir):
    """Rank 0 finds the cache directory locked: every rank must raise, none may wait."""
    x, y = join_group(rank, world, store)
    est = SAMInfluenceFunction(mlp_model(), TensorDataset(x, y), os.path.join(run_dir, "c.pt"),
                               loss_fn=ce_loss(), batch_size=4, rho=0.1, projection_dim=None,
                               hessian_reg=0.0, hessian_inverse_tol=None)  # fmt: skip
    errors = {}
    try:
        est.save_intermediate_quantities(os.path.join(run_dir, "cache"))
    except ValueError as err:
        errors["cache"] = str(err)
    leave_group(run_dir, "locked", rank, errors)


@pytest.mark.slow
def test_a_failure_on_rank_zero_fails_every_rank(tmp_path):
    import time

    from captum_sam.core.files import DirectoryLock

    start = time.monotonic()
    with DirectoryLock(str(tmp_path / "cache"), "another writer"):  # held by this process
        found = spawn_two(tmp_path, locked_cache_worker, "locked")
    assert time.monotonic() - start < 50  # not the 60 s collective timeout
    for errors in found:
        assert "being written by another process" in errors["cache"]
