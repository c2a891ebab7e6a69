import math
import re
import warnings

import pytest
import torch

from captum_sam.solvers import (
    ConvergenceWarning,
    InverseOperator,
    SolverOptions,
    arnoldi,
    bicgstab,
    cg,
    dense_matrix,
    gmres,
    lissa,
    neumann,
    spectral_radius,
)

DIM = 30
F64 = torch.float64


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return q


def _spd(n: int = DIM, lo: float = 0.5, hi: float = 10.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = _orthogonal(n, gen)
    eigs = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=F64)
    eigs[0], eigs[1] = lo, hi  # pin the condition number
    return (q * eigs) @ q.T


def _nonsymmetric(n: int = DIM, seed: int = 1):
    # SPD + skew part: every eigenvalue has real part in [0.5, 10].
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, n, generator=gen, dtype=F64)
    skew = (g - g.T) / 2
    return _spd(n, seed=seed) + skew / torch.linalg.matrix_norm(skew, 2)


def _indefinite(n: int = DIM, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    q = _orthogonal(n, gen)
    eigs = torch.linspace(-3.0, 10.0, n, dtype=F64)
    eigs = eigs[eigs.abs() > 0.2]
    eigs = torch.cat([eigs, torch.full((n - eigs.numel(),), 1.0, dtype=F64)])
    return (q * eigs) @ q.T


MATRICES = {"spd": _spd, "nonsym": _nonsymmetric, "indefinite": _indefinite}


def _rhs(shape: str, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if shape == "vector":
        return torch.randn(DIM, generator=gen, dtype=F64)
    b = torch.randn(DIM, 3, generator=gen, dtype=F64)
    b[:, 1] = 0  # a zero column
    return b


class Counter:
    """Matvec wrapper counting calls and recording the widths it receives."""

    def __init__(self, a: torch.Tensor):
        self.a = a
        self.calls = 0
        self.widths: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 2 and x.shape[0] == self.a.shape[0]
        self.calls += 1
        self.widths.append(x.shape[1])
        return self.a @ x


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref))


def _true_residual(a, x, b):
    x2, b2 = (x[:, None], b[:, None]) if b.ndim == 1 else (x, b)
    num = torch.linalg.vector_norm(a @ x2 - b2, dim=0)
    den = torch.linalg.vector_norm(b2, dim=0)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), 0)


def _warned_residual(record) -> float:
    messages = [str(w.message) for w in record if w.category is ConvergenceWarning]
    assert messages, "no ConvergenceWarning"
    match = re.search(r"residual ([-+0-9.einf]+)", messages[0])
    assert match, messages[0]
    return float(match.group(1))


SOLVERS = {"cg": cg, "bicgstab": bicgstab, "gmres": gmres, "neumann": neumann}
CASES = [
    ("cg", "spd"),
    ("bicgstab", "spd"),
    ("bicgstab", "nonsym"),
    ("gmres", "spd"),
    ("gmres", "nonsym"),
    ("neumann", "spd"),
    ("neumann", "nonsym"),
]


@pytest.mark.parametrize("shape", ["vector", "matrix"])
@pytest.mark.parametrize(("solver", "kind"), CASES)
def test_iterative_matches_linalg_solve(solver, kind, shape):
    a = MATRICES[kind]()
    b = _rhs(shape)
    tol = 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        result = SOLVERS[solver](lambda x: a @ x, b, SolverOptions(tol=tol))
    ref = torch.linalg.solve(a, b)
    assert result.x.shape == b.shape and result.x.dtype == b.dtype
    assert torch.isfinite(result.x).all() and torch.isfinite(result.residual).all()
    cond = float(torch.linalg.cond(a))
    assert _rel_err(result.x, ref) <= 10 * tol * cond
    m = 1 if b.ndim == 1 else b.shape[1]
    assert result.residual.shape == (m,)
    assert (result.residual <= tol).all()
    # reported residuals are the true ones
    torch.testing.assert_close(
        result.residual, _true_residual(a, result.x, b), rtol=1e-3, atol=1e-14
    )
    if shape == "matrix":
        assert (result.x[:, 1] == 0).all() and result.residual[1] == 0


@pytest.mark.parametrize("restart", [4, 50])
def test_gmres_restarts(restart):
    a = _nonsymmetric()
    b = _rhs("matrix")
    result = gmres(lambda x: a @ x, b, SolverOptions(tol=1e-10, restart=restart))
    assert _rel_err(result.x, torch.linalg.solve(a, b)) < 1e-8
    if restart == 4:
        assert result.iterations > restart


@pytest.mark.parametrize("solver", ["cg", "bicgstab", "gmres"])
def test_initial_guess(solver):
    a = _spd()
    b = _rhs("matrix")
    ref = torch.linalg.solve(a, b)
    x0 = ref + 1e-3 * torch.ones_like(ref)
    cold = SOLVERS[solver](lambda x: a @ x, b, SolverOptions(tol=1e-10))
    warm = SOLVERS[solver](lambda x: a @ x, b, SolverOptions(tol=1e-10), x0=x0)
    assert _rel_err(warm.x, ref) < 1e-8
    assert warm.iterations < cold.iterations
    assert (warm.x[:, 1] == 0).all()


@pytest.mark.parametrize(("solver", "kind"), CASES)
def test_one_matvec_call_per_iteration_for_all_columns(solver, kind):
    a = MATRICES[kind]()
    gen = torch.Generator().manual_seed(7)
    b = torch.randn(DIM, 6, generator=gen, dtype=F64)
    options = SolverOptions(tol=1e-8, scale=12.0)  # no power iteration
    batched = Counter(a)
    result = SOLVERS[solver](batched, b, options)
    assert batched.widths[0] == b.shape[1]  # all columns in one call
    single_calls = []
    for j in range(b.shape[1]):
        single = Counter(a)
        SOLVERS[solver](single, b[:, j], options)
        single_calls.append(single.calls)
    # the batch costs as much as its slowest column, not the sum over columns
    assert batched.calls <= max(single_calls) + 2
    assert batched.calls < sum(single_calls) / 2
    # only a few residual checks on top of the iterations
    assert batched.calls - result.iterations <= 3


def test_dense_matrix_and_dense_operator():
    a = _nonsymmetric()
    counter = Counter(a)
    formed = dense_matrix(counter, DIM, dtype=F64, device="cpu", chunk_size=7)
    torch.testing.assert_close(formed, a, rtol=0, atol=0)
    assert counter.calls == math.ceil(DIM / 7)

    op = InverseOperator(
        lambda x: a @ x,
        DIM,
        method="dense",
        symmetric=False,
        rmatvec=lambda x: a.T @ x,
        options=SolverOptions(chunk_size=8),
    )
    torch.testing.assert_close(op.matrix(), a)
    for shape in ("vector", "matrix"):
        b = _rhs(shape)
        torch.testing.assert_close(op.solve(b), torch.linalg.solve(a, b))
        assert op.last_residual.max() < 1e-12 and op.last_iterations == 0
        torch.testing.assert_close(op.solve_transpose(b), torch.linalg.solve(a.T, b))
        assert op.last_residual.max() < 1e-12


def test_dense_operator_keeps_dtype_of_b():
    a = _spd()
    op = InverseOperator(lambda x: a @ x, DIM, symmetric=True)
    assert op.method == "dense"
    b = _rhs("matrix").float()
    x = op.solve(b)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, torch.linalg.solve(a, b.double()).float())


@pytest.mark.parametrize("method", ["gmres", "bicgstab"])
@pytest.mark.parametrize("shape", ["vector", "matrix"])
def test_nonsymmetric_operator_transpose(method, shape):
    a = _nonsymmetric()
    b = _rhs(shape)
    op = InverseOperator(
        lambda x: a @ x,
        DIM,
        method=method,
        symmetric=False,
        rmatvec=lambda x: a.T @ x,
        options=SolverOptions(tol=1e-11),
    )
    x = op.solve(b)
    assert _rel_err(x, torch.linalg.solve(a, b)) < 1e-9
    xt = op.solve_transpose(b)
    assert xt.shape == b.shape
    assert _rel_err(xt, torch.linalg.solve(a.T, b)) < 1e-9
    assert op.last_residual.max() <= 1e-11 and op.last_iterations > 0


@pytest.mark.parametrize(
    ("symmetric", "dense_max_dim", "expected"),
    [(True, DIM, "dense"), (True, 0, "cg"), (False, 0, "gmres")],
)
def test_auto_method(symmetric, dense_max_dim, expected):
    a = _spd()
    op = InverseOperator(
        lambda x: a @ x,
        DIM,
        symmetric=symmetric,
        rmatvec=lambda x: a.T @ x,
        options=SolverOptions(dense_max_dim=dense_max_dim, tol=1e-10),
    )
    assert op.method == expected
    b = _rhs("matrix")
    assert _rel_err(op.solve(b), torch.linalg.solve(a, b)) < 1e-8


def test_neumann_operator_caches_scale():
    a = _spd()
    counter = Counter(a)
    op = InverseOperator(
        counter, DIM, method="neumann", symmetric=True, options=SolverOptions(tol=1e-9)
    )
    b = _rhs("matrix")
    assert _rel_err(op.solve(b), torch.linalg.solve(a, b)) < 1e-7
    assert counter.calls > op.last_iterations  # power iteration on first solve
    counter.calls = 0
    op.solve_transpose(b)
    assert counter.calls == op.last_iterations  # scale reused


@pytest.mark.parametrize("method", ["cg", "arnoldi"])
def test_symmetric_only_methods_refuse_nonsymmetric(method):
    a = _nonsymmetric()
    with pytest.raises(ValueError, match="not symmetric"):
        InverseOperator(
            lambda x: a @ x,
            DIM,
            method=method,
            symmetric=False,
            rmatvec=lambda x: a.T @ x,
        )


def test_invalid_arguments():
    a = _spd()
    with pytest.raises(ValueError, match="gmres"):
        InverseOperator(lambda x: a @ x, DIM, method="qr", symmetric=True)
    with pytest.raises(ValueError, match="rmatvec"):
        InverseOperator(lambda x: a @ x, DIM, method="gmres", symmetric=False)
    with pytest.raises(ValueError, match="sampled_matvec"):
        InverseOperator(lambda x: a @ x, DIM, method="lissa", symmetric=True)
    with pytest.raises(ValueError, match="rows"):
        InverseOperator(lambda x: a @ x, DIM, symmetric=True).solve(torch.ones(3))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tol", -1),
        ("tol", 0.0),
        ("max_iter", 0),
        ("restart", 2.5),
        ("scale", -1.0),
        ("rank", 0),
        ("krylov_dim", 3),
        ("lissa_repeats", True),
        ("seed", -1),
    ],
)
def test_solver_options_validation(field, value):
    with pytest.raises(ValueError, match=field):
        SolverOptions(**{field: value})


def test_cg_nonconvergence_warns_with_residual():
    a = _spd()
    b = _rhs("matrix")
    with pytest.warns(ConvergenceWarning, match="cg") as record:
        result = cg(lambda x: a @ x, b, SolverOptions(max_iter=2))
    assert result.iterations == 2
    worst = float(result.residual.max())
    assert worst > 1e-6
    assert _warned_residual(record) == pytest.approx(worst, rel=1e-2)


def test_neumann_diverges_on_indefinite_matrix():
    a = _indefinite()
    b = _rhs("matrix")
    with pytest.warns(ConvergenceWarning, match="neumann") as record:
        result = neumann(lambda x: a @ x, b, SolverOptions(neumann_terms=300))
    worst = float(result.residual.max())
    assert worst > 1.0
    assert _warned_residual(record) == pytest.approx(worst, rel=1e-2)
    assert torch.isfinite(result.x).all() and result.residual[1] == 0


def test_operator_warns_for_iterative_methods():
    a = _nonsymmetric()
    op = InverseOperator(
        lambda x: a @ x,
        DIM,
        method="gmres",
        symmetric=False,
        rmatvec=lambda x: a.T @ x,
        options=SolverOptions(max_iter=3),
    )
    with pytest.warns(ConvergenceWarning, match="gmres"):
        op.solve(_rhs("matrix"))
    assert op.last_residual.max() > 1e-6


def test_spectral_radius():
    a = _spd()
    true = float(torch.linalg.eigvalsh(a).abs().max())
    estimate = spectral_radius(lambda x: a @ x, DIM, dtype=F64, device="cpu")
    assert estimate == pytest.approx(true, rel=1e-2)
    n = _nonsymmetric()
    true = float(torch.linalg.eigvals(n).abs().max())
    estimate = spectral_radius(lambda x: n @ x, DIM, dtype=F64, device="cpu")
    assert estimate == pytest.approx(true, rel=1e-2)


@pytest.mark.parametrize("shape", ["vector", "matrix"])
def test_arnoldi_full_rank_equals_exact_solve(shape):
    a = _spd()
    b = _rhs(shape)
    op = InverseOperator(
        lambda x: a @ x,
        DIM,
        method="arnoldi",
        symmetric=True,
        options=SolverOptions(rank=DIM),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        x = op.solve(b)
        xt = op.solve_transpose(b)
    ref = torch.linalg.solve(a, b)
    assert _rel_err(x, ref) < 1e-8 and _rel_err(xt, ref) < 1e-8
    assert op.last_residual.max() < 1e-8


def _top_k_solve(a, b, k):
    values, vectors = torch.linalg.eigh(a)
    values, vectors = values[-k:], vectors[:, -k:]
    return vectors @ ((vectors.T @ b) / values[:, None]), values.flip(0)


@pytest.mark.parametrize("krylov_dim", [None, DIM])
def test_arnoldi_low_rank_matches_top_k_eigh(krylov_dim):
    gen = torch.Generator().manual_seed(5)
    q = _orthogonal(DIM, gen)
    eigs = torch.cat(
        [
            torch.tensor([50.0, 40.0, 30.0, 25.0, 20.0], dtype=F64),
            0.5 + 1.5 * torch.rand(DIM - 5, generator=gen, dtype=F64),
        ]
    )
    a = (q * eigs) @ q.T
    k = 5
    b = _rhs("matrix")
    options = SolverOptions(rank=k, krylov_dim=krylov_dim)
    values, vectors = arnoldi(lambda x: a @ x, DIM, dtype=F64, device="cpu", options=options)
    ref, ref_values = _top_k_solve(a, b, k)
    assert values.shape == (k,) and vectors.shape == (DIM, k)
    torch.testing.assert_close(values, ref_values, rtol=1e-8, atol=0)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(k, dtype=F64))
    op = InverseOperator(lambda x: a @ x, DIM, method="arnoldi", symmetric=True, options=options)
    x = op.solve(b)
    assert _rel_err(x, ref) < 1e-6
    assert op.last_residual[0] > 1e-3  # low rank: not a solve, and no warning
    assert op.last_residual[1] == 0


def test_arnoldi_handles_invariant_start():
    a = 3.0 * torch.eye(DIM, dtype=F64)  # Krylov space of any start is 1-D
    values, vectors = arnoldi(
        lambda x: a @ x, DIM, dtype=F64, device="cpu", options=SolverOptions(rank=4)
    )
    torch.testing.assert_close(values, torch.full((4,), 3.0, dtype=F64))
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(4, dtype=F64))


def test_lissa_exact_sampling_equals_neumann():
    a = _spd()
    b = _rhs("matrix")
    options = SolverOptions(scale=11.0, neumann_terms=60, lissa_depth=60, tol=1e-300)
    with pytest.warns(ConvergenceWarning):
        series = neumann(lambda x: a @ x, b, options)
    with pytest.warns(ConvergenceWarning):
        stochastic = lissa(lambda x, step: a @ x, b, options, matvec=lambda x: a @ x)
    torch.testing.assert_close(stochastic.x, series.x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(stochastic.residual, series.residual)
    assert stochastic.iterations == 60
    # independent reference: the truncated series computed with matrix powers
    step = torch.eye(DIM, dtype=F64) - a / 11.0
    power, total = torch.eye(DIM, dtype=F64), torch.zeros(DIM, DIM, dtype=F64)
    for _ in range(61):
        total, power = total + power, power @ step
    torch.testing.assert_close(stochastic.x, total @ b / 11.0)


def test_lissa_noisy_sampling_is_unbiased():
    gen = torch.Generator().manual_seed(11)
    parts = torch.stack([_spd(DIM, 1.0, 4.0, seed=20 + i) for i in range(4)])
    a = parts.mean(0)
    depth, repeats = 150, 40
    choice = torch.randint(4, (depth * repeats,), generator=gen)
    steps_seen = []

    def sampled(x, step):
        steps_seen.append(step)
        return parts[choice[step]] @ x

    b = _rhs("matrix")
    options = SolverOptions(scale=4.5, lissa_depth=depth, lissa_repeats=repeats)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        result = lissa(sampled, b, options)
    assert steps_seen == list(range(depth * repeats))  # fresh sample every step
    assert result.residual.isnan().all()
    assert result.iterations == depth * repeats
    assert (result.x[:, 1] == 0).all()
    ref = torch.linalg.solve(a, b)
    assert _rel_err(result.x, ref) < 0.05
    # one sample is much noisier than the average of the repeats
    single = lissa(sampled, b, SolverOptions(scale=4.5, lissa_depth=depth))
    assert _rel_err(single.x, ref) > _rel_err(result.x, ref)


def test_lissa_needs_a_scale():
    a = _spd()
    with pytest.raises(ValueError, match="scale"):
        lissa(lambda x, step: a @ x, _rhs("vector"))
    result = lissa(
        lambda x, step: a @ x,
        _rhs("vector"),
        SolverOptions(lissa_depth=400, tol=1e-4),
        matvec=lambda x: a @ x,
    )
    assert result.residual.shape == (1,) and result.residual[0] < 1e-4


def test_lissa_operator_nonsymmetric_transpose():
    a = _nonsymmetric()
    op = InverseOperator(
        lambda x: a @ x,
        DIM,
        method="lissa",
        symmetric=False,
        rmatvec=lambda x: a.T @ x,
        sampled_matvec=lambda x, step: a @ x,
        sampled_rmatvec=lambda x, step: a.T @ x,
        options=SolverOptions(lissa_depth=600, tol=1e-6),
    )
    b = _rhs("matrix")
    assert _rel_err(op.solve(b), torch.linalg.solve(a, b)) < 1e-5
    assert _rel_err(op.solve_transpose(b), torch.linalg.solve(a.T, b)) < 1e-5
    assert torch.isfinite(op.last_residual).all()


@pytest.mark.parametrize("solver", ["cg", "bicgstab", "gmres", "neumann"])
def test_all_zero_rhs(solver):
    a = _spd()
    counter = Counter(a)
    result = SOLVERS[solver](counter, torch.zeros(DIM, 2, dtype=F64))
    assert (result.x == 0).all() and (result.residual == 0).all()
    assert result.iterations == 0


def test_arnoldi_operator_drops_non_positive_eigenvalues():
    a = _indefinite()
    b = _rhs("matrix")
    op = InverseOperator(
        lambda x: a @ x,
        DIM,
        method="arnoldi",
        symmetric=True,
        options=SolverOptions(rank=DIM),
    )
    values, vectors = torch.linalg.eigh(a)
    keep = values > 0
    ref = vectors[:, keep] @ ((vectors[:, keep].T @ b) / values[keep, None])
    assert _rel_err(op.solve(b), ref) < 1e-8


def test_default_tolerance_follows_the_dtype():
    assert SolverOptions().tolerance(torch.float64) == 1e-6
    assert SolverOptions().tolerance(torch.float32) == 1e-4
    assert SolverOptions().tolerance(torch.bfloat16) == 1e-2
    assert SolverOptions(tol=1e-9).tolerance(torch.float32) == 1e-9
    with pytest.raises(ValueError, match="tol"):
        SolverOptions(tol=0.0)
    # condition number 1e3 in float32: the dense solve leaves rounding-level residuals
    a = _spd(n=200, lo=1e-2, hi=10.0).float()
    b = _rhs("vector").float().repeat(7)[:200]
    op = InverseOperator(lambda x: a @ x, 200, method="dense", symmetric=True, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        x = op.solve(b)
    residual = float(torch.linalg.norm(a @ x - b) / torch.linalg.norm(b))
    assert 1e-6 < residual < 1e-4  # float64's 1e-6 would have warned, float32's does not
    # cg in float32 stops at 1e-4 instead of running to max_iter after 1e-6
    spd = _spd().float()
    result = cg(lambda x: spd @ x, _rhs("vector").float(), SolverOptions())
    assert float(result.residual.max()) <= 1e-4
    tight = cg(lambda x: spd @ x, _rhs("vector").float(), SolverOptions(tol=1e-6))
    assert result.iterations < tight.iterations


@pytest.mark.parametrize("kind", ["spd", "indefinite"])
def test_dense_symmetric_uses_cholesky_only_when_positive_definite(kind):
    a = MATRICES[kind]()
    op = InverseOperator(lambda x: a @ x, DIM, method="dense", symmetric=True)
    b = _rhs("matrix")
    torch.testing.assert_close(op.solve(b), torch.linalg.solve(a, b))
    torch.testing.assert_close(op.solve_transpose(b), torch.linalg.solve(a, b))
    assert op.last_residual.max() < 1e-12
    assert (op._cholesky is not None) == (kind == "spd")
    assert (op._lu is not None) == (kind == "indefinite")


def test_dense_builder_replaces_the_matvec_columns():
    a = _nonsymmetric()

    def no_matvec(x):
        raise AssertionError("the matrix came from the builder: no matvec expected")

    op = InverseOperator(
        no_matvec, DIM, method="dense", symmetric=False, rmatvec=no_matvec, dense_builder=lambda: a
    )
    b = _rhs("matrix")
    torch.testing.assert_close(op.solve(b), torch.linalg.solve(a, b))
    torch.testing.assert_close(op.solve_transpose(b), torch.linalg.solve(a.T, b))

    counter = Counter(a)  # a builder that declines: formed from matvec columns
    op = InverseOperator(counter, DIM, method="dense", symmetric=False, rmatvec=counter)
    op.dense_builder = lambda: None
    torch.testing.assert_close(op.matrix(), a)
    assert counter.calls > 0

    op = InverseOperator(
        lambda x: a @ x, DIM, method="dense", symmetric=True, dense_builder=lambda: a[:-1]
    )
    with pytest.raises(ValueError, match="dense_builder returned shape"):
        op.solve(b)


def test_an_overflowed_residual_is_an_error_not_a_zero_solution():
    """float32 right-hand sides whose norm overflows: the Krylov solvers stopped at 0
    iterations and returned x = 0 with a warning; now a ValueError says why."""
    spd = _spd(DIM, 1.0, 4.0, seed=3).float()
    b = torch.full((DIM, 1), 1e20, dtype=torch.float32)  # finite, its squared norm is not
    for solver in (cg, gmres, bicgstab):
        with pytest.raises(ValueError, match="residual is NaN.*overflowed"):
            solver(lambda x: spd @ x, b, SolverOptions())
