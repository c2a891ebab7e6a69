"""The Captum-facing methods every SAM-GIF twin shares (``TracInCPBase``'s contract).

:class:`SAMTracInBase` holds ``influence``, ``self_influence``, the intermediate
quantities, caching and editing, each delegating to the engines a subclass wires in
its constructor (:func:`~captum_sam.gif.setup.build_engines`). The twins
(:class:`~captum_sam.SAMTracInCP`, :class:`~captum_sam.SAMTracInCPFast`) differ only in
what they attribute and which arguments they take.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from captum_sam._captum import KMostInfluentialResults, TracInCPBase
from captum_sam.core.data import (
    as_loader,
    batch_context,
    check_batch_size,
    check_indices,
    empty_batch,
    empty_result,
    local_batches,
    progress,
    stream_topk,
)
from captum_sam.core.distributed import gather_ordered, is_distributed
from captum_sam.core.errors import require_inputs
from captum_sam.core.store import open_quantities
from captum_sam.gif.segment_edit import SegmentEdit, check_segment_options
from captum_sam.gif.setup import GIFEngines, resolve_checkpoints
from captum_sam.gif.terms import Term, checkpoint_terms
from captum_sam.gif.unrolled_replay import UnrolledReplay, check_removal
from captum_sam.trajectory import MANIFEST, load_trajectory, sam_settings

__all__ = ["EDIT_METHODS", "SAMTracInBase", "check_rho"]

EDIT_METHODS = ("first_order", "linearised", "segment")


class SAMTracInBase(TracInCPBase):
    """Captum's ``TracInCPBase`` methods on top of the SAM-GIF engines (``self._engines``)."""

    _engines: GIFEngines
    _replay: UnrolledReplay | None = None

    def _dtype(self) -> torch.dtype:
        return self._engines.points.reference(self._engines.terms[0].checkpoint).dtype

    def _captum_init(
        self, model: nn.Module, train_dataset: Any, checkpoints: Any, captum: dict[str, Any],
        rho: Any, adaptive: Any,
    ) -> None:  # fmt: skip
        """Captum's ``TracInCPBase`` set-up (checkpoints resolved first), then ``rho``.

        ``captum``: ``checkpoints_load_func``, ``loss_fn``, ``batch_size``, ``test_loss_fn``.
        """
        rho, adaptive = sam_settings(rho, adaptive, checkpoints)
        check_rho(rho, adaptive)
        if not isinstance(train_dataset, DataLoader):  # before Captum's bare assert
            check_batch_size(captum["batch_size"], "train_dataset")
        TracInCPBase.__init__(
            self, model, train_dataset, iter(resolve_checkpoints(checkpoints)),  # kept order
            captum["checkpoints_load_func"], captum["loss_fn"], captum["batch_size"],
            captum["test_loss_fn"],
        )  # fmt: skip
        self.rho, self.adaptive = float(rho), adaptive
        self.trajectory = None

    def _captum_init_on(
        self, traj: Any, model: nn.Module, train_dataset: Any, captum: dict[str, Any]
    ) -> None:
        """:meth:`_captum_init` on a recorded run's checkpoints, with its first step's rho."""
        self._captum_init(
            model, train_dataset, [c.path for c, _ in traj.segments()], captum,
            traj.steps[0].rho, traj.steps[0].adaptive,
        )  # fmt: skip

    def _checkpoint_terms(self, loader: Any) -> list[Term]:
        """One term per checkpoint, with the learning rate its loader returns."""
        rates = [loader(c).learning_rate for c in self.checkpoints]
        return checkpoint_terms(self.checkpoints, rates, self.rho, self.adaptive)

    @property
    def engines(self) -> GIFEngines:
        """The engines this estimator delegates to (gradient sources, forms, quantities)."""
        return self._engines

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
            ``(n_test, n_train)`` scores (``(1, n_train)`` with ``aggregate``); positive
            means the training example reduced the test loss (a proponent). With ``k``,
            Captum's ``KMostInfluentialResults(indices, influence_scores)``, each
            ``(n_test, k)``.
        """
        require_inputs(inputs)
        if empty_batch(inputs):  # no test example: an empty result
            return empty_result(self._engines.n_train, k, aggregate, self._dtype())
        if k is None:
            return self._influence(inputs, show_progress=show_progress, aggregate=aggregate)
        return self._get_k_most_influential(
            inputs, k, proponents, show_progress=show_progress, aggregate=aggregate
        )

    def _blocks(
        self, inputs: Any, aggregate: bool, desc: str | None, stream: bool
    ) -> Iterable[Tensor]:
        """Score blocks ``(n_test, batch)`` in training order (streamed if ``stream``)."""
        e = self._engines
        test = as_loader(inputs, self.batch_size, "inputs", ordered=not aggregate)
        e.prepare(self.train_dataloader if e.cache is None else None)
        if e.cache is not None:
            q = self.compute_intermediate_quantities(inputs, aggregate=aggregate, side="test")
            return e.cache.scores(q)
        if e.trajectory is not None:
            return [e.trajectory.influence(test, aggregate, desc is not None, self.get_name())]
        train = progress(
            local_batches(self.train_dataloader, e.device),
            desc is not None,
            desc or "",
            total=self.train_dataloader_len,
        )

        def again() -> Iterable[Any]:
            return local_batches(self.train_dataloader, e.device)

        blocks = e.form.columns(test, train, aggregate, again)
        if stream and not is_distributed():
            return (b for _, b in blocks)
        return gather_ordered(list(blocks))

    def _influence(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> Tensor:
        desc = f"Using {self.get_name()} to compute influence for training batches"
        return torch.cat(
            list(self._blocks(inputs, aggregate, desc if show_progress else None, False)), 1
        )

    def _get_k_most_influential(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader,
        k: int = 5,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> KMostInfluentialResults:
        desc = (
            f"Using {self.get_name()} to perform computation for getting "
            f"{'proponents' if proponents else 'opponents'}. Processing training batches"
        )
        blocks = self._blocks(inputs, aggregate, desc if show_progress else None, True)
        return KMostInfluentialResults(*stream_topk(blocks, k, proponents))

    def self_influence(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader | None = None,
        show_progress: bool = False,
        outer_loop_by_checkpoints: bool = False,
    ) -> Tensor:
        r"""Self influence :math:`\sum_c \eta_c \nabla l_k(w_c)\cdot\nabla l_k(w_c+\epsilon_c)`.

        Args:
            inputs: Examples (batch tuple or DataLoader); default the training set.
                The trajectory form needs batch membership, so it accepts only the
                training set (``None``).
            show_progress: Progress bar(s).
            outer_loop_by_checkpoints: As in Captum: loop over checkpoints outside and
                batches inside (one checkpoint's weights in memory at a time) instead
                of batches outside. The scores are the same.

        Returns:
            ``(n_examples,)`` scores, the diagonal of train-vs-train influence.
        """
        e, name = self._engines, self.get_name()
        if empty_batch(inputs):
            return torch.zeros(0, dtype=self._dtype(), device=e.device)
        if e.trajectory is not None:
            if inputs is not None:
                raise ValueError(
                    "the trajectory form defines self influence for the training set "
                    "only (it needs batch membership): call self_influence() with "
                    "inputs=None"
                )
            e.prepare()
            return e.trajectory.self_influence(show_progress, name, e.form.pair_dots)
        if inputs is None and not outer_loop_by_checkpoints:
            merged = e.form.merged_self_influence(
                self.train_dataloader, e.n_train, show_progress, name
            )
            if merged is not None:
                return merged
        e.prepare()
        data = (
            self.train_dataloader
            if inputs is None
            else as_loader(inputs, self.batch_size, "inputs")
        )
        groups = [[t] for t in e.terms] if outer_loop_by_checkpoints else [e.terms]
        outer = progress(
            groups,
            show_progress and outer_loop_by_checkpoints,
            f"Using {name} to compute self influence. Processing checkpoint",
        )
        total = None
        for terms in outer:
            bar = progress(
                local_batches(data, e.device),
                show_progress,
                f"Using {name} to compute self influence. Processing batch",
                total=_length(data),
            )
            where = "train_dataset" if inputs is None else "inputs"
            parts = []
            for i, b in bar:
                with batch_context(where, i):
                    parts.append((i, e.form.pair_dots(terms, b)))
            parts = gather_ordered(parts)
            if not parts:
                raise ValueError("`inputs` is empty")
            scores = torch.cat(parts)
            total = scores if total is None else total + scores
        return total  # type: ignore[return-value]

    # ------------------------------------------------------------------ quantities

    def compute_intermediate_quantities(
        self,
        inputs: tuple[Any, ...] | DataLoader | None = None,
        aggregate: bool = False,
        *,
        side: str = "train",
    ) -> Tensor:
        r"""Per-example vectors whose inner products give the influence scores.

        ``side="train"`` (default, Captum's quantity at ``rho = 0``): per checkpoint
        :math:`\eta_c \nabla l(w_c + \epsilon_c)` of ``loss_fn``. ``side="test"``: raw
        test-side gradients :math:`\nabla l(z; w_c)` of ``test_loss_fn``, so
        ``compute_intermediate_quantities(test, side="test") @
        compute_intermediate_quantities(train).T == influence(test)``. (Captum's
        ``TracInCP`` multiplies both of its sides by :math:`\eta_c`, so its product
        equals its influence only when every learning rate is 1.)

        Args:
            inputs: Examples; default the training set. The trajectory form needs
                batch membership for ``side="train"``, so only ``None`` is accepted.
            aggregate: Sum over the examples (``(1, D)``).
            side: ``"train"`` or ``"test"``.

        Returns:
            ``(n_examples, n_checkpoints * D)``: one block of ``D`` per distinct
            checkpoint, in order of first use; ``D = P``, or ``projection_dim``.
        """
        self._engines.prepare()
        return self._engines.quantities.compute(inputs, aggregate, side)

    def save_intermediate_quantities(self, directory: str | os.PathLike[str]) -> str:
        """Compute the training side (``side="train"``) and store it in ``directory``.

        One torch file per training batch plus a manifest with a fingerprint of the
        checkpoints (SHA-256), the settings, the loss and the training data.

        Returns:
            The directory.
        """
        self._engines.prepare()
        return self._engines.quantities.save(directory, type(self).__name__, self.model)

    def load_intermediate_quantities(self, directory: str | os.PathLike[str]) -> Tensor:
        """The cached training side ``(n_train, D)``; refused if stale (``ValueError``)."""
        fingerprint = self._engines.quantities.fingerprint(type(self).__name__, self.model)
        return open_quantities(directory, fingerprint).load(self._engines.device)

    def use_intermediate_quantities(self, directory: str | os.PathLike[str] | None) -> None:
        """Make ``influence`` read the training side from a cache (``None``: stop).

        The cache is validated now (a stale one raises ``ValueError``) and then
        streamed part by part at every ``influence`` call.
        """
        fingerprint = self._engines.quantities.fingerprint(type(self).__name__, self.model)
        self._engines.cache = None if directory is None else open_quantities(directory, fingerprint)

    # ------------------------------------------------------------------ editing

    def parameter_change(
        self,
        indices: Sequence[int] | Tensor,
        flat: bool = False,
        show_progress: bool = False,
        method: str = "first_order",
        removal: str = "renormalise",
        *,
        curvature: str = "ggn",
        steps_per_checkpoint: int | None = None,
        weight_decay: float = 0.0,
        krylov_steps: int = 60,
    ) -> dict[str, Tensor] | Tensor:
        r"""Estimate of :math:`w_{-S} - w_T` for removing the examples ``indices``.

        ``method="first_order"`` (GIF):
        :math:`\sum_{\text{terms}} c \sum_{k \in S \cap B} \nabla l_k(w + \epsilon)`, the
        descent steps the removed examples contributed, added back. In trajectory form
        :math:`c = \eta_t/|B_t|` and :math:`B = B_t`; in checkpoint form
        :math:`c = \eta_c` and every example counts at every checkpoint.

        ``method="linearised"`` (trajectory form only): the linearised replay
        :math:`\delta s_{t+1} = J_t \delta s_t + \Phi_t(s_t; a^{-S}) - \Phi_t(s_t; 1)`
        (:mod:`~captum_sam.gif.unrolled_replay`), which carries every step's change
        through the Jacobians of the later SAM steps (perturbation and momentum
        included) at the recorded weights. It changes every trainable parameter.

        ``method="segment"`` (checkpoint form, ``perturbation="dataset"``): SOURCE-style
        segments (:mod:`~captum_sam.gif.segment_edit`): between checkpoints the
        training steps are linearised with the curvature held at the checkpoint's
        perturbed weights, so each checkpoint's contribution is damped by the steps
        after it; the checkpoint weight :math:`c_l = \eta_l/|B|` is read as one pass
        over the training set per checkpoint interval (training time
        :math:`\tau_l = c_l n`). Attributed parameters.

        Args:
            indices: Training indices of the set :math:`S`.
            flat: Return one flat vector ``(P,)`` instead of a dict.
            show_progress: Progress bar.
            method: ``"first_order"``, ``"linearised"`` or ``"segment"``.
            removal: For ``"linearised"`` and ``"segment"``: ``"renormalise"`` (the
                kept examples' mean, an emptied batch skipped: trained without
                :math:`S`) or ``"zero_weight"`` (removed examples weighted 0, still
                divided by :math:`|B_t|`). ``"first_order"`` is zero weight.
            curvature: For ``"segment"``: ``"ggn"`` or ``"hessian"`` of the mean
                training loss.
            steps_per_checkpoint: For ``"segment"``: training steps :math:`K` per
                checkpoint interval (``None``: the gradient-flow limit).
            weight_decay: For ``"segment"``: the training's weight decay (added to the
                curvature).
            krylov_steps: For ``"segment"``: Lanczos steps per matrix function (a
                ``RuntimeWarning`` when its error estimate exceeds 1e-3).

        Returns:
            A dict (parameter name -> tensor of the parameter's shape), or a flat
            ``(P,)`` tensor in ``named_parameters`` order; attributed parameters for
            ``"first_order"``, every trainable parameter for ``"linearised"``.
        """
        if method not in EDIT_METHODS:
            raise ValueError(f"`method` must be one of {EDIT_METHODS}, got {method!r}")
        if method == "linearised":
            check_removal(removal)
            replay = self.unrolled_replay()
            change = replay.change(
                check_indices(indices, self._engines.n_train), removal, show_progress=show_progress
            )
            return torch.cat([change[n].flatten() for n in replay.names]) if flat else change
        e = self._engines
        idx = check_indices(indices, e.n_train)  # every argument before any work
        if method == "segment":
            check_removal(removal)
            check_segment_options(curvature, steps_per_checkpoint, weight_decay, krylov_steps)
            if self.trajectory is not None:
                raise ValueError(
                    "method='segment' is for the checkpoint form; a recorded trajectory "
                    "has method='linearised'"
                )
        e.prepare()
        if self.trajectory is None:
            _refuse_recorded_rates(e.terms)
        if method == "segment":
            total = SegmentEdit(
                e.points, e.terms, e.quantities.train_dataloader, e.n_train, e.device
            ).change(
                idx, removal, curvature, steps_per_checkpoint, float(weight_decay),
                krylov_steps, show_progress,
            )  # fmt: skip
        else:
            total = e.quantities.parameter_change(idx, show_progress)
        return total if flat else e.unflatten(total)

    def edited_model(
        self,
        indices: Sequence[int] | Tensor,
        show_progress: bool = False,
        method: str = "first_order",
        removal: str = "renormalise",
        **segment: Any,
    ) -> nn.Module:
        """A new model: the final weights plus :meth:`parameter_change` (user's model untouched).

        The final weights are the trajectory's final checkpoint, or in checkpoint form
        the last checkpoint. ``method``, ``removal`` and the keyword options of
        ``method="segment"`` as in :meth:`parameter_change`.
        """
        delta = self.parameter_change(
            indices, show_progress=show_progress, method=method, removal=removal, **segment
        )
        return self._engines.edited(self.model, delta)  # type: ignore[arg-type]

    def unrolled_replay(self) -> UnrolledReplay:
        """The linearised replay of the recorded run (built once; trajectory form only)."""
        if self.trajectory is None:
            raise ValueError(
                "method='linearised' needs a recorded trajectory: build the estimator with "
                "SAMTracInCP.from_trajectory"
            )
        if getattr(self, "_replay", None) is None:
            self._replay = UnrolledReplay(
                self.model,
                self._engines.quantities.train_data,
                (self.loss_fn, self.reduction_type),
                (self.test_loss_fn, self.test_reduction_type),
                self.trajectory,
                self.checkpoints_load_func,
            )
        return self._replay


def check_rho(rho: Any, adaptive: Any) -> None:
    """Validate the SAM radius and the ASAM flag."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0:
        raise ValueError(f"`rho` must be a number >= 0, got {rho!r}")
    if rho == float("inf"):
        raise ValueError("`rho` must be finite")
    if not isinstance(adaptive, bool):
        raise TypeError(f"`adaptive` must be a bool, got {adaptive!r}")


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def _refuse_recorded_rates(terms: Sequence[Term]) -> None:
    r"""Refuse checkpoint-form edit weights that are a recorded run's learning rates.

    A checkpoint-form edit weighs checkpoint ``l`` by :math:`c_l = \eta_l/|B|` (one
    pass over the data per interval, :doc:`/math`); a recorder's checkpoint stores
    :math:`\eta_l`, which the default loader returns, so the edit would come out
    :math:`|B|` times too large. Checkpoints that sit in a record directory are
    compared with its manifest, whatever loader or list of paths brought them.

    Raises:
        ValueError: A coefficient equals the recorded learning rate with batches of
            more than one example.
    """
    records: dict[str, Any] = {}  # directory -> its trajectory (None: none readable)
    for term in terms:
        directory = os.path.dirname(os.path.abspath(term.checkpoint))
        if directory not in records:
            records[directory] = _readable_trajectory(directory)
        traj = records[directory]
        if traj is None:
            continue  # no trajectory to compare with
        name = os.path.basename(term.checkpoint)
        record = next((c for c in traj.checkpoints if os.path.basename(c.path) == name), None)
        sizes = [len(s.indices) for s in traj.steps]
        if record is None or not sizes or sum(sizes) <= len(sizes):
            continue
        if abs(term.coefficient - record.learning_rate) <= 1e-12 * abs(record.learning_rate):
            raise ValueError(
                f"checkpoint {term.checkpoint!r} of a recorded run is weighted by its "
                f"learning rate {record.learning_rate:g}, but a checkpoint-form edit "
                "weighs a checkpoint by eta/|B| (one pass over the data per interval; "
                f"docs/math.rst): the edit would be about {sum(sizes) / len(sizes):.3g} "
                "times too large. Use SAMTracInCP.from_trajectory (the recorded batches, "
                "exact) or a checkpoints_load_func returning eta/|B|"
            )


def _readable_trajectory(directory: str) -> Any:
    """The trajectory recorded in ``directory`` (unverified), or ``None``."""
    if not os.path.isfile(os.path.join(directory, MANIFEST)):
        return None
    try:
        return load_trajectory(directory, allow_incomplete=True, verify=False)
    except (ValueError, OSError):
        return None
