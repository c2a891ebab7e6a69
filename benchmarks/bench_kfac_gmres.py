"""SAM-HIF full/exact with K-FAC/EK-FAC: GMRES with and without the Kronecker preconditioner.

    python benchmarks/bench_kfac_gmres.py [--model mlp|cnn] [--n-train 500] [--n-test 20]

``full`` and ``exact`` have the non-symmetric :math:`A = K_e (I + J_K) + rI` with
:math:`J_K = \\frac{\\rho}{n \\lVert g_0 \\rVert} P_u K_0`. Issue 15 asked to decide between
GMRES preconditioned by :math:`(K_e + rI)^{-1}` and a Woodbury form of the
rank-structured :math:`J` by measurement. Only :math:`P_u = I - u u^\\top` is low-rank;
:math:`K_0` is full-rank and has another eigenbasis than :math:`K_e` (another point),
so a Woodbury/Sherman-Morrison step removes the rank-one part only and still needs
:math:`(K_e + c K_e K_0 + rI)^{-1}`, which has no closed form: a Krylov solve either
way. What is measured here is the Krylov route itself: the test rows
:math:`A^{-\\top} g` of ``--n-test`` test examples solved by GMRES (tolerance 1e-8)
right-preconditioned by the exact Kronecker inverse (the library's default) and
unpreconditioned, against a dense solve of the same :math:`A` formed column by column
from the same Kronecker operator (float64 digits model, trained with recorded SAM).
Printed per row: GMRES iterations (``last_iterations``), seconds and the largest
relative error.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine, table, trained_digits

from captum_sam.hif import kfac_solve
from captum_sam.hif.influence import SAMInfluenceFunction
from captum_sam.solvers import SolverOptions

LOSS = torch.nn.CrossEntropyLoss(reduction="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--damping", type=float, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    data, model, traj = trained_digits(
        args.model, n_train=args.n_train, epochs=args.epochs, dtype=torch.float64
    )
    xt, yt = (t[: args.n_test] for t in data.test.tensors)
    print(
        f"{machine()}; digits {args.model}, n_train {args.n_train}, n_test {len(xt)}, "
        f"rho {args.rho}, damping {args.damping}"
    )
    options = SolverOptions(tol=1e-8, max_iter=2000)
    rows = []
    for curvature in ("kfac", "ekfac"):
        for variant in ("full", "exact"):
            est = SAMInfluenceFunction(
                model, data.train, traj.final.path, loss_fn=LOSS, batch_size=250,
                rho=args.rho, weight_decay=1e-3, damping=args.damping, variant=variant,
                curvature=curvature, solver="gmres", projection_dim=None, hessian_reg=0.0,
                hessian_inverse_tol=None, solver_options=options,
            )  # fmt: skip
            op = est.operator
            test_grads = _test_gradients(est, xt, yt)  # (n_test, P)
            dense = est.matrix()  # A from the Kronecker operator, column by column
            want = torch.linalg.solve(dense.T, test_grads.T)  # A^{-T} g
            pre = est._kronecker_inverse().inverse.solve
            for name, precondition in (("(K_e + rI)^-1", pre), ("none", None)):
                solver = kfac_solve.PreconditionedSolver(
                    op.matvec, op.rmatvec, precondition, op.dim, "gmres", options,
                    torch.float64, est.device,
                )  # fmt: skip
                start = time.perf_counter()
                got = solver.solve_transpose(test_grads.T.clone())
                seconds = time.perf_counter() - start
                err = float((got - want).abs().max() / want.abs().max())
                rows.append((curvature, variant, name, str(solver.last_iterations),
                             f"{seconds:.2f}", f"{err:.1e}"))  # fmt: skip
                print(rows[-1], flush=True)
    print(table(rows, ("curvature", "variant", "preconditioner", "iterations", "seconds",
                       "max rel. error vs dense")))  # fmt: skip


def _test_gradients(est: SAMInfluenceFunction, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example test gradients at ``w*`` ``(n_test, P)``, the right-hand sides solved."""
    from captum_sam.hif import sides

    return sides.gradients(est, (x, y), est._test_loss, est.operator.params)


if __name__ == "__main__":
    main()
