r"""SAM-GIF: TracIn-style influence with training gradients at SAM-perturbed weights.

:class:`SAMTracInCP` is a drop-in for Captum's ``TracInCP``. For checkpoints
:math:`w_c` with learning rates :math:`\eta_c` the score of training example
:math:`z_k` on a test example :math:`z` is

.. math:: \mathrm{score}(z, z_k) = \sum_c \eta_c\, \nabla l(z; w_c) \cdot
          \nabla l_k(w_c + \epsilon_c),

the training gradient taken where SAM training evaluates it. With ``rho = 0`` this is
exactly Captum's ``TracInCP``. :meth:`SAMTracInCP.from_trajectory` builds the
trajectory form of a recorded run, which weights every example by its real batch
membership: :math:`\sum_t \eta_t [k \in B_t] / |B_t|\, \nabla l(z; w_t) \cdot
\nabla l_k(w_t + \epsilon_t)`, with :math:`w_t` the latest saved checkpoint (the
TracIn-CP approximation) and :math:`\epsilon_t` recomputed there from the mean
gradient of the recorded batch :math:`B_t`.

Learning-rate convention (one for all three paths): the coefficient
(:math:`\eta_c`, or :math:`\eta_t/|B_t|`) sits on the *training* side only.
``influence`` and ``self_influence`` use it once, and
``compute_intermediate_quantities(side="train")`` returns coefficient-weighted
gradients while ``side="test"`` returns raw gradients, so
``test_q @ train_q.T == influence``. (Captum multiplies both sides of its
intermediate quantities by the learning rate, which squares it.)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from captum_sam import functional as F
from captum_sam._captum import KMostInfluentialResults, TracInCPBase
from captum_sam._utils import (
    CheckpointLoader,
    CheckpointState,
    as_loader,
    make_loss,
    model_device,
    on_device,
    ordered_dataset,
    progress,
    stream_topk,
    validate_batch,
)
from captum_sam.trajectory import (
    MANIFEST,
    Trajectory,
    checkpoints_load_func,
    fetch_batch,
    load_trajectory,
)

__all__ = ["SAMTracInCP"]

PERTURBATIONS = ("dataset", "example")
TRAJECTORY_PERTURBATIONS = ("batch", "dataset", "example")


@dataclass(frozen=True)
class _Term:
    """One summand: a checkpoint, a coefficient and the examples it applies to."""

    checkpoint: str
    coefficient: float
    indices: tuple[int, ...] | None  # None: every training example
    rho: float
    adaptive: bool


class SAMTracInCP(TracInCPBase):
    r"""SAM-GIF as a Captum ``TracInCPBase``: gradients at the SAM-perturbed weights.

    Args:
        model: The model (never modified: checkpoints load into a private copy).
        train_dataset: Training Dataset, or a DataLoader iterating it in order.
        checkpoints: Checkpoint paths, a directory of them, or a record directory
            from :class:`~captum_sam.TrajectoryRecorder` (its saved checkpoints).
        checkpoints_load_func: ``load(model, path) -> learning_rate``
            (Captum's convention); default :func:`captum_sam.checkpoints_load_func`.
        layers: Module names whose parameters are attributed (default: all
            trainable parameters). The perturbation is then computed over these
            parameters only (the others are held fixed).
        loss_fn: Per-example training loss, ``reduction="none"``, returning shape
            ``(batch,)``. A reducing loss is refused with a ``ValueError``.
        batch_size: Batch size when ``train_dataset`` is a Dataset.
        test_loss_fn: Per-example loss for test examples (default ``loss_fn``).
        rho: SAM radius used in training.
        adaptive: ASAM perturbation.
        perturbation: ``"dataset"`` (one :math:`\epsilon_c` per checkpoint from the
            mean gradient over ``perturbation_dataset``) or ``"example"`` (each
            example's own gradient, the m = 1 case of m-sharpness).
        perturbation_dataset: Data for the ``"dataset"`` perturbation (default: the
            training set).
        test_at_perturbed: Take the test gradient at the perturbed weights too.

    Shapes: ``influence`` returns ``(n_test, n_train)``; positive means the training
    example reduced the test loss (a proponent).
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset | DataLoader,
        checkpoints: str | os.PathLike[str] | Sequence[str],
        checkpoints_load_func: Callable[[nn.Module, str], float] = checkpoints_load_func,
        layers: Sequence[str] | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        batch_size: int | None = 64,
        test_loss_fn: Callable[[Any, Any], Tensor] | None = None,
        rho: float = 0.05,
        adaptive: bool = False,
        perturbation: str = "dataset",
        perturbation_dataset: Dataset | DataLoader | None = None,
        test_at_perturbed: bool = False,
    ) -> None:
        self._setup(
            model,
            train_dataset,
            _resolve_checkpoints(checkpoints),
            checkpoints_load_func,
            layers,
            loss_fn,
            batch_size,
            test_loss_fn,
            perturbation,
            PERTURBATIONS,
            perturbation_dataset,
            test_at_perturbed,
        )
        _check_rho(rho, adaptive)
        self.rho, self.adaptive = float(rho), bool(adaptive)
        self.trajectory: Trajectory | None = None
        self._terms = [
            _Term(c, self._loader(c).learning_rate, None, self.rho, self.adaptive)
            for c in self.checkpoints
        ]
        self._final_checkpoint = self.checkpoints[-1]
        self._validate_first_batch()

    @classmethod
    def from_trajectory(
        cls,
        model: nn.Module,
        train_dataset: Dataset | DataLoader,
        record_dir: str | os.PathLike[str] | Trajectory,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        layers: Sequence[str] | None = None,
        batch_size: int | None = 64,
        test_loss_fn: Callable[[Any, Any], Tensor] | None = None,
        perturbation: str = "batch",
        perturbation_dataset: Dataset | DataLoader | None = None,
        test_at_perturbed: bool = False,
        checkpoints_load_func: Callable[[nn.Module, str], float] = checkpoints_load_func,
    ) -> SAMTracInCP:
        r"""SAM-GIF in trajectory form, from a recorded run.

        Every recorded step :math:`t` contributes
        :math:`\eta_t [k \in B_t]/|B_t|\, \nabla l(z; w_t)\cdot\nabla l_k(w_t+\epsilon_t)`
        with the step's own ``lr``, ``rho`` and ``adaptive``; :math:`w_t` is the latest
        checkpoint saved at or before step :math:`t`.

        Args:
            model: The model (never modified).
            train_dataset: The training set the trajectory indexes into.
            record_dir: Record directory (or a loaded :class:`~captum_sam.Trajectory`).
            loss_fn: Per-example training loss.
            layers: Attributed module names.
            batch_size: Batch size for test inputs given as a Dataset.
            test_loss_fn: Per-example test loss.
            perturbation: ``"batch"`` (default: from the recorded batch, the
                perturbation training used), ``"dataset"`` or ``"example"``.
            perturbation_dataset: Data for ``"dataset"`` (default: training set).
            test_at_perturbed: Test gradient at the perturbed weights.
            checkpoints_load_func: Checkpoint loader.

        Returns:
            An estimator whose scores follow the recorded batch membership.
        """
        traj = record_dir if isinstance(record_dir, Trajectory) else load_trajectory(record_dir)
        if not traj.steps:
            raise ValueError(f"the trajectory in {traj.directory!r} has no recorded steps")
        self = cls.__new__(cls)
        groups = traj.segments()
        self._setup(
            model,
            train_dataset,
            [c.path for c, _ in groups],
            checkpoints_load_func,
            layers,
            loss_fn,
            batch_size,
            test_loss_fn,
            perturbation,
            TRAJECTORY_PERTURBATIONS,
            perturbation_dataset,
            test_at_perturbed,
        )
        if self.n_train != traj.n_train:
            raise ValueError(
                f"`train_dataset` has {self.n_train} examples but the trajectory was "
                f"recorded on {traj.n_train}"
            )
        self.trajectory = traj
        self.rho, self.adaptive = traj.steps[0].rho, traj.steps[0].adaptive
        self._terms = []
        for ckpt, steps in groups:
            for t in steps:
                s = traj.steps[t]
                self._terms.append(
                    _Term(ckpt.path, s.lr / len(s.indices), s.indices, s.rho, s.adaptive)
                )
        self._final_checkpoint = traj.final.path
        self._validate_first_batch()
        return self

    # ------------------------------------------------------------------ set-up

    def _setup(
        self,
        model: nn.Module,
        train_dataset: Dataset | DataLoader,
        checkpoints: list[str],
        load_func: Callable[[nn.Module, str], float],
        layers: Sequence[str] | None,
        loss_fn: Any,
        batch_size: int | None,
        test_loss_fn: Any,
        perturbation: str,
        allowed: tuple[str, ...],
        perturbation_dataset: Dataset | DataLoader | None,
        test_at_perturbed: bool,
    ) -> None:
        if perturbation not in allowed:
            raise ValueError(f"`perturbation` must be one of {allowed}, got {perturbation!r}")
        if not isinstance(test_at_perturbed, bool):
            raise TypeError("`test_at_perturbed` must be a bool")
        if isinstance(train_dataset, Dataset) and not isinstance(batch_size, int):
            raise ValueError("`batch_size` must be an int when `train_dataset` is a Dataset")
        TracInCPBase.__init__(
            self, model, train_dataset, checkpoints, load_func, loss_fn, batch_size, test_loss_fn
        )
        self.layers = None if layers is None else list(layers)
        self.names = F.attributed_names(model, self.layers)
        self._loader = CheckpointLoader(model, self.names, load_func)
        self._loss = make_loss(model, loss_fn, {}, "loss_fn")
        self._test_loss = make_loss(model, self.test_loss_fn, {}, "test_loss_fn")
        self.train_data = ordered_dataset(train_dataset)
        self.n_train = len(self.train_data)  # type: ignore[arg-type]
        if self.n_train == 0:
            raise ValueError("`train_dataset` is empty")
        self.perturbation = perturbation
        self.perturbation_dataloader = (
            self.train_dataloader
            if perturbation_dataset is None
            else as_loader(perturbation_dataset, batch_size, "perturbation_dataset")
        )
        self.test_at_perturbed = test_at_perturbed
        self.device = model_device(model)
        self._dataset_eps: dict[tuple[str, float, bool], F.Params] = {}

    def _validate_first_batch(self) -> None:
        state = self._loader(self._terms[0].checkpoint)
        batch = next(iter(on_device(self.train_dataloader, self.device)))
        with F.eval_mode(self.model):
            validate_batch(self._floss(state, self._loss), state.params, batch, "train_dataset")

    # ------------------------------------------------------------------ gradients

    def _floss(self, state: CheckpointState, loss: F.FunctionalLoss) -> F.FunctionalLoss:
        return F.FunctionalLoss(self.model, loss.loss_fn, state.frozen)

    def _eps(self, term: _Term, state: CheckpointState) -> F.Params | None:
        """The term's shared perturbation; ``None`` for per-example perturbations."""
        if self.perturbation == "example":
            return None
        if self.perturbation == "dataset":
            key = (state.path, term.rho, term.adaptive)
            if key not in self._dataset_eps:
                g, _ = F.mean_grad(
                    self._floss(state, self._loss),
                    state.params,
                    on_device(self.perturbation_dataloader, self.device),
                )
                F.check_finite(g, f"perturbation gradients at checkpoint {state.path!r}")
                self._dataset_eps[key] = F.sam_perturbation(
                    state.params, g, term.rho, term.adaptive
                )
            return self._dataset_eps[key]
        batch = self._fetch(term.indices)  # "batch": the recorded batch's mean gradient
        g, _ = F.mean_grad(self._floss(state, self._loss), state.params, [batch])
        F.check_finite(g, f"gradients of a recorded batch at checkpoint {state.path!r}")
        return F.sam_perturbation(state.params, g, term.rho, term.adaptive)

    def _grads(
        self,
        state: CheckpointState,
        batch: tuple[Any, ...],
        loss: F.FunctionalLoss,
        term: _Term | None = None,
        eps: F.Params | None = None,
        what: str = "training gradients",
    ) -> F.Params:
        """Per-example gradients at ``w`` or, given a term, at ``w + eps``.

        Returns:
            Dict name -> ``(batch, numel)`` (views, no copy of the gradients).
        """
        floss = self._floss(state, loss)
        if term is None:
            grads = F.per_example_grads(floss, state.params, batch)
        elif eps is not None:
            grads = F.per_example_grads(floss, F.tree_add(state.params, eps), batch)
        else:
            own = F.per_example_grads(floss, state.params, batch)
            eps_i = F.per_example_perturbations(state.params, own, term.rho, term.adaptive)
            moved = {k: state.params[k] + eps_i[k] for k in state.params}
            grads = F.per_example_grads(floss, moved, batch, params_per_example=True)
        return {n: grads[n].reshape(grads[n].shape[0], -1) for n in self.names}

    def _train_side(
        self, term: _Term, state: CheckpointState, batch: tuple[Any, ...], eps: F.Params | None
    ) -> F.Params:
        return self._grads(state, batch, self._loss, term, eps)

    def _test_side(
        self,
        term: _Term,
        state: CheckpointState,
        batch: tuple[Any, ...],
        loss: F.FunctionalLoss,
        eps: F.Params | None,
    ) -> F.Params:
        if self.test_at_perturbed:
            return self._grads(state, batch, loss, term, eps, what="test gradients")
        return self._grads(state, batch, loss, what="test gradients")

    def _fetch(self, indices: Sequence[int] | None) -> tuple[Any, ...]:
        return F.to_device(fetch_batch(self.train_data, list(indices or [])), self.device)

    def _test_matrix(
        self,
        term: _Term,
        state: CheckpointState,
        eps: F.Params | None,
        inputs: Iterable[tuple[Any, ...]],
        aggregate: bool,
    ) -> F.Params:
        rows = []
        for i, b in enumerate(on_device(inputs, self.device)):
            floss = self._floss(state, self._test_loss)
            validate_batch(floss, state.params, b, "inputs", run_loss=i == 0)
            rows.append(self._test_side(term, state, b, self._test_loss, eps))
        if not rows:
            raise ValueError("`inputs` is empty")
        out = {n: torch.cat([r[n] for r in rows]) for n in self.names}
        _finite(out, "test gradients", state)
        return {n: v.sum(dim=0, keepdim=True) for n, v in out.items()} if aggregate else out

    def _test_key(self, term: _Term, index: int) -> tuple[Any, ...]:
        # test gradients depend on the term only through its checkpoint, unless they
        # are taken at a perturbation that changes from term to term
        if self.test_at_perturbed and self.perturbation == "batch":
            return ("term", index)
        return ("ckpt", term.checkpoint, term.rho, term.adaptive)

    # ------------------------------------------------------------------ Captum API

    def influence(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader,
        k: int | None = None,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> Tensor | KMostInfluentialResults:
        """Influence of every training example on every test example.

        Args:
            inputs: A test batch ``(features..., labels)`` or a DataLoader of them.
            k: If given, return the ``k`` proponents (or opponents) per test example.
            proponents: Highest (``True``) or lowest (``False``) scores with ``k``.
            show_progress: Progress bar over training batches or recorded steps.
            aggregate: Sum over the test examples (influence on a validation set).

        Returns:
            ``(n_test, n_train)`` scores (``(1, n_train)`` with ``aggregate``), or
            Captum's ``KMostInfluentialResults(indices, influence_scores)`` of shape
            ``(n_test, k)`` each.
        """
        if inputs is None:
            raise ValueError("`inputs` is required; use self_influence() for self influence")
        if k is None:
            return self._influence(inputs, show_progress=show_progress, aggregate=aggregate)
        return self._get_k_most_influential(
            inputs, k, proponents, show_progress=show_progress, aggregate=aggregate
        )

    def _influence(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> Tensor:
        test = as_loader(inputs, self.batch_size, "inputs")
        with F.eval_mode(self.model):
            if self.trajectory is None:
                return torch.cat(list(self._stream_columns(test, aggregate, show_progress)), dim=1)
            return self._trajectory_influence(test, aggregate, show_progress)

    def _stream_columns(
        self, test: Iterable[tuple[Any, ...]], aggregate: bool, show_progress: bool
    ) -> Iterable[Tensor]:
        """Checkpoint form: yield ``(n_test, batch)`` score blocks, batch by batch."""
        states = [self._loader(t.checkpoint) for t in self._terms]
        eps = [self._eps(t, s) for t, s in zip(self._terms, states)]
        tests = [
            self._test_matrix(t, s, e, test, aggregate) for t, s, e in zip(self._terms, states, eps)
        ]
        batches = progress(
            self.train_dataloader, show_progress, f"{self.get_name()}: training batches"
        )
        for batch in on_device(batches, self.device):
            block = None
            for term, state, e, t in zip(self._terms, states, eps, tests):
                part = term.coefficient * _gram(t, self._train_side(term, state, batch, e))
                block = part if block is None else block + part
            yield _finite(block, "training gradients", states[0])

    def _trajectory_influence(
        self, test: Iterable[tuple[Any, ...]], aggregate: bool, show_progress: bool
    ) -> Tensor:
        cache: dict[tuple[Any, ...], Tensor] = {}
        scores = None
        steps = progress(
            list(enumerate(self._terms)), show_progress, f"{self.get_name()}: recorded steps"
        )
        for i, term in steps:
            state = self._loader(term.checkpoint)
            eps = self._eps(term, state)
            key = self._test_key(term, i)
            if key not in cache:
                if key[0] == "ckpt":
                    cache.clear()  # terms are grouped by checkpoint: free the last one
                cache[key] = self._test_matrix(term, state, eps, test, aggregate)
            t = cache[key]
            if scores is None:
                first = t[self.names[0]]
                scores = first.new_zeros(first.shape[0], self.n_train)
            g = self._train_side(term, state, self._fetch(term.indices), eps)
            gram = _finite(_gram(t, g), "training gradients", state)
            scores[:, list(term.indices)] += term.coefficient * gram  # type: ignore[arg-type]
        return scores  # type: ignore[return-value]

    def _get_k_most_influential(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader,
        k: int = 5,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> KMostInfluentialResults:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive int, got {k!r}")
        sign = 1.0 if proponents else -1.0
        test = as_loader(inputs, self.batch_size, "inputs")
        with F.eval_mode(self.model):
            if self.trajectory is not None:
                scores = self._trajectory_influence(test, aggregate, show_progress)
                values, indices = torch.topk(sign * scores, min(k, self.n_train), dim=1)
                return KMostInfluentialResults(indices, sign * values)
            blocks = self._stream_columns(test, aggregate, show_progress)
            return KMostInfluentialResults(*stream_topk(blocks, k, proponents))

    def self_influence(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        r"""Self influence :math:`\sum_c \eta_c \nabla l_k(w_c)\cdot\nabla l_k(w_c+\epsilon_c)`.

        Args:
            inputs: Examples (batch tuple or DataLoader); default the training set.
                The trajectory form needs batch membership, so it accepts only the
                training set (``None``).
            show_progress: Progress bar.

        Returns:
            ``(n_examples,)`` scores, the diagonal of train-vs-train influence.
        """
        with F.eval_mode(self.model):
            if self.trajectory is not None:
                if inputs is not None:
                    raise ValueError(
                        "the trajectory form defines self influence for the training set "
                        "only (it needs batch membership): call self_influence() with "
                        "inputs=None"
                    )
                return self._trajectory_self_influence(show_progress)
            data = (
                self.train_dataloader
                if inputs is None
                else as_loader(inputs, self.batch_size, "inputs")
            )
            states = [self._loader(t.checkpoint) for t in self._terms]
            eps = [self._eps(t, s) for t, s in zip(self._terms, states)]
            out = []
            for batch in on_device(
                progress(data, show_progress, f"{self.get_name()}: self influence"), self.device
            ):
                total = None
                for term, state, e in zip(self._terms, states, eps):
                    part = term.coefficient * self._pair_dots(term, state, batch, e)
                    total = part if total is None else total + part
                out.append(total)
            if not out:
                raise ValueError("`inputs` is empty")
            return torch.cat(out)

    def _pair_dots(
        self, term: _Term, state: CheckpointState, batch: tuple[Any, ...], eps: F.Params | None
    ) -> Tensor:
        train = self._train_side(term, state, batch, eps)
        test = self._test_side(term, state, batch, self._loss, eps)
        return _finite(sum((test[n] * train[n]).sum(dim=1) for n in self.names), "gradients", state)

    def _trajectory_self_influence(self, show_progress: bool) -> Tensor:
        scores = None
        for term in progress(self._terms, show_progress, f"{self.get_name()}: self influence"):
            state = self._loader(term.checkpoint)
            dots = self._pair_dots(term, state, self._fetch(term.indices), self._eps(term, state))
            if scores is None:
                scores = dots.new_zeros(self.n_train)
            scores[list(term.indices)] += term.coefficient * dots  # type: ignore[arg-type]
        return scores  # type: ignore[return-value]

    def compute_intermediate_quantities(
        self,
        inputs: tuple[Any, ...] | DataLoader | None = None,
        aggregate: bool = False,
        side: str = "train",
    ) -> Tensor:
        """Per-example vectors whose inner products give the influence scores.

        ``compute_intermediate_quantities(test, side="test") @
        compute_intermediate_quantities(side="train").T == influence(test)``.

        Args:
            inputs: Examples; default the training set. The trajectory form needs
                batch membership for ``side="train"``, so only ``None`` is accepted
                there.
            aggregate: Sum over the examples (``(1, D)``).
            side: ``"train"``: coefficient-weighted gradients at the perturbed
                weights; ``"test"``: raw test-side gradients (``test_loss_fn``).

        Returns:
            ``(n_examples, n_checkpoints * P)``: one block of ``P`` per distinct
            checkpoint, in order of first use.
        """
        if side not in ("train", "test"):
            raise ValueError(f"`side` must be 'train' or 'test', got {side!r}")
        ckpts = list(dict.fromkeys(t.checkpoint for t in self._terms))
        with F.eval_mode(self.model):
            if side == "test":
                if self.test_at_perturbed and self.perturbation == "batch":
                    raise ValueError(
                        "with test_at_perturbed and the recorded-batch perturbation the test "
                        "side changes at every step: it has no fixed intermediate quantity"
                    )
                data = as_loader(
                    self.train_dataloader if inputs is None else inputs, self.batch_size, "inputs"
                )
                first = {t.checkpoint: t for t in reversed(self._terms)}
                blocks = []
                for c in ckpts:
                    term, state = first[c], self._loader(c)
                    blocks.append(
                        _cat(
                            self._test_matrix(term, state, self._eps(term, state), data, aggregate),
                            self.names,
                        )
                    )
                return torch.cat(blocks, dim=1)
            if self.trajectory is not None:
                if inputs is not None:
                    raise ValueError(
                        "the trajectory form defines training-side quantities for the "
                        "training set only: pass inputs=None"
                    )
                return self._trajectory_train_quantities(ckpts, aggregate)
            data = as_loader(
                self.train_dataloader if inputs is None else inputs, self.batch_size, "inputs"
            )
            rows = []
            for batch in on_device(data, self.device):
                blocks = {c: None for c in ckpts}
                for term in self._terms:
                    state = self._loader(term.checkpoint)
                    g = term.coefficient * _cat(
                        self._train_side(term, state, batch, self._eps(term, state)), self.names
                    )
                    prev = blocks[term.checkpoint]
                    blocks[term.checkpoint] = g if prev is None else prev + g
                rows.append(torch.cat([blocks[c] for c in ckpts], dim=1))
            out = _finite(torch.cat(rows), "training gradients", self._loader(ckpts[0]))
            return out.sum(dim=0, keepdim=True) if aggregate else out

    def _trajectory_train_quantities(self, ckpts: list[str], aggregate: bool) -> Tensor:
        size = sum(self._loader(ckpts[0]).params[n].numel() for n in self.names)
        out = None
        for term in self._terms:
            state = self._loader(term.checkpoint)
            g = _cat(
                self._train_side(term, state, self._fetch(term.indices), self._eps(term, state)),
                self.names,
            )
            if out is None:
                out = g.new_zeros(self.n_train, len(ckpts) * size)
            j = ckpts.index(term.checkpoint) * size
            out[list(term.indices), j : j + size] += term.coefficient * g  # type: ignore[arg-type]
        return out.sum(dim=0, keepdim=True) if aggregate else out  # type: ignore[union-attr]

    # ------------------------------------------------------------------ editing

    def parameter_change(
        self, indices: Sequence[int] | Tensor, flat: bool = False, show_progress: bool = False
    ) -> F.Params | Tensor:
        r"""GIF estimate of :math:`w_{-S} - w_T` for removing the examples ``indices``.

        :math:`\sum_{\text{terms}} c \sum_{k \in S \cap B} \nabla l_k(w + \epsilon)`:
        the descent steps the removed examples contributed, added back. In trajectory
        form :math:`c = \eta_t/|B_t|` and :math:`B = B_t`; in checkpoint form
        :math:`c = \eta_c` and every example counts at every checkpoint, so the scale
        is whatever the checkpoints' learning rates encode.

        Args:
            indices: Training indices of the set :math:`S`.
            flat: Return one flat vector ``(P,)`` instead of a dict.
            show_progress: Progress bar.

        Returns:
            A dict (attributed parameter name -> tensor of the parameter's shape), or
            a flat ``(P,)`` tensor in ``named_parameters`` order.
        """
        removed = _check_removal(indices, self.n_train)
        total: Tensor | None = None
        with F.eval_mode(self.model):
            for term in progress(self._terms, show_progress, "GIF parameter change"):
                members = sorted(removed if term.indices is None else removed & set(term.indices))
                if not members:
                    continue
                state = self._loader(term.checkpoint)
                eps = self._eps(term, state)
                for start in range(0, len(members), self.batch_size or 64):
                    chunk = members[start : start + (self.batch_size or 64)]
                    g = _cat(
                        self._train_side(term, state, self._fetch(chunk), eps), self.names
                    ).sum(dim=0)
                    total = term.coefficient * g if total is None else total + term.coefficient * g
        if total is not None:
            _finite(total, "training gradients", self._loader(self._terms[0].checkpoint))
        if total is None:
            state = self._loader(self._terms[0].checkpoint)
            total = F.flatten(state.params, self.names).new_zeros(
                sum(state.params[n].numel() for n in self.names)
            )
        if flat:
            return total
        return F.unflatten(
            total, {n: self._loader(self._terms[0].checkpoint).params[n] for n in self.names}
        )

    def edited_model(
        self, indices: Sequence[int] | Tensor, show_progress: bool = False
    ) -> nn.Module:
        """A new model: the final weights plus :meth:`parameter_change` (user's model untouched).

        The final weights are the trajectory's final checkpoint, or in checkpoint form
        the last checkpoint.
        """
        delta = self.parameter_change(indices, show_progress=show_progress)
        edited = copy.deepcopy(self.model)
        self._loader.load_func(edited, self._final_checkpoint)
        with torch.no_grad():
            named = dict(edited.named_parameters())
            for name, d in delta.items():  # type: ignore[union-attr]
                named[name].add_(d.to(named[name]))
        return edited


def _gram(a: F.Params, b: F.Params) -> Tensor:
    """``sum_name a[name] @ b[name].T``: all pairwise inner products, ``(len(a), len(b))``."""
    return sum(a[n] @ b[n].T for n in a)  # type: ignore[return-value]


def _cat(a: F.Params, names: Sequence[str]) -> Tensor:
    return torch.cat([a[n] for n in names], dim=1)


def _finite(x: Any, what: str, state: CheckpointState) -> Any:
    """Return ``x``, or raise if it holds NaN/inf (NaN gradients propagate into it)."""
    values = x.values() if isinstance(x, dict) else [x]
    if not all(bool(torch.isfinite(v).all()) for v in values):
        raise ValueError(
            f"{what} at checkpoint {state.path!r} contain NaN or inf: check the inputs, the "
            "loss function and the checkpoint weights"
        )
    return x


def _check_rho(rho: Any, adaptive: Any) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0:
        raise ValueError(f"`rho` must be a number >= 0, got {rho!r}")
    if not isinstance(adaptive, bool):
        raise TypeError(f"`adaptive` must be a bool, got {adaptive!r}")


def _check_removal(indices: Sequence[int] | Tensor, n: int) -> set[int]:
    idx = torch.as_tensor(indices)
    if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError("`indices` must be a 1-D sequence of integer training indices")
    if idx.numel() == 0:
        raise ValueError("`indices` is empty: name at least one training example to remove")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"`indices` must lie in [0, {n})")
    return {int(i) for i in idx}


def _resolve_checkpoints(checkpoints: Any) -> list[str]:
    if isinstance(checkpoints, (str, os.PathLike)):
        path = os.fspath(checkpoints)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST)):
            traj = load_trajectory(path)
            paths = [c.path for c in traj.checkpoints]
        elif os.path.isdir(path):
            paths = sorted(
                os.path.join(path, f)
                for f in os.listdir(path)
                if os.path.isfile(os.path.join(path, f)) and not f.startswith(".")
            )
        else:
            paths = [path]
    else:
        try:
            paths = [os.fspath(c) for c in checkpoints]
        except TypeError as err:
            raise TypeError("`checkpoints` must be a path, a directory or a list of paths") from err
    if not paths:
        raise ValueError(f"`checkpoints` is empty: no checkpoint found in {checkpoints!r}")
    return paths
