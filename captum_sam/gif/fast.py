r"""SAM-GIF on the final fully-connected layer: the twin of Captum's ``TracInCPFast``.

Captum's ``TracInCPFast`` attributes the weight :math:`W` of the last linear layer
only, whose per-example gradient is the outer product of the loss gradient in the
layer output :math:`d` and the layer input :math:`a`, so a score needs no gradient
formed: :math:`\sum_c \eta_c (d \cdot d')(a \cdot a')`. :class:`SAMTracInCPFast`
computes the same from the same factors (:mod:`captum_sam.core.layers.linear`), the
training example's at the SAM-perturbed weights :math:`w_c + \epsilon_c` (the
perturbation is the training's, over every trainable parameter, see
``perturbation_scope``); at ``rho = 0`` it is Captum's ``TracInCPFast``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from captum_sam.core.checkpoints import checkpoints_load_func
from captum_sam.core.errors import ArgumentError
from captum_sam.gif.base import SAMTracInBase
from captum_sam.gif.points import PERTURBATIONS
from captum_sam.gif.setup import GIFOptions, build_engines

__all__ = ["SAMTracInCPFast", "final_layer"]


def final_layer(model: nn.Module, layer: nn.Module | str) -> tuple[str, nn.Linear]:
    """The name and module of ``final_fc_layer`` (a module of ``model`` or its name).

    Raises:
        ValueError: A name that is no module of ``model`` (Captum's message).
        TypeError: Not an ``nn.Linear``, or a module that is not part of ``model``.
    """
    modules = dict(model.named_modules())
    if isinstance(layer, str):
        if layer not in modules or not layer:
            raise ValueError(f'Invalid final_fc_layer str: "{layer}" provided!')
        name, module = layer, modules[layer]
    else:
        found = [n for n, m in modules.items() if m is layer]
        if not found:
            raise TypeError("`final_fc_layer` must be a module of `model` or its name")
        name, module = found[0], layer
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"`final_fc_layer` {name!r} is a {type(module).__name__}; the fast path needs "
            "an nn.Linear (its weight gradient is an outer product)"
        )
    return name, module


class SAMTracInCPFast(SAMTracInBase):
    r"""SAM-GIF of the last linear layer's weight, from layer inputs and output gradients.

    The first nine arguments are Captum ``TracInCPFast``'s, with its meanings; the rest
    are keyword-only and SAM's own.

    Args:
        model: The model (never modified; ``requires_grad`` is never changed).
        final_fc_layer: The last ``nn.Linear`` (module or name); its weight is
            attributed (not its bias, as in Captum).
        train_dataset: Training Dataset, or a DataLoader iterating it in order.
        checkpoints: Directory, list or iterator of checkpoint paths (see
            :class:`~captum_sam.SAMTracInCP`).
        checkpoints_load_func: ``load(model, path) -> learning_rate``.
        loss_fn: A reducing loss (``reduction`` ``"sum"`` or ``"mean"``), required.
        batch_size: Batch size when ``train_dataset`` is a Dataset.
        test_loss_fn: Loss for test examples (default ``loss_fn``), also reducing.
        vectorize: Captum's switch for ``torch.autograd.functional.jacobian``; the
            gradients here are exact either way, so it changes nothing.
        rho: SAM radius of training (0 gives Captum's ``TracInCPFast``). Default ``None``: the
            recorded run's or 0.05 (:func:`~captum_sam.trajectory.sam_settings`).
        adaptive: ASAM. Default ``None``: as for ``rho`` (else ``False``).
        perturbation: ``"dataset"`` or ``"example"`` (see :class:`~captum_sam.SAMTracInCP`).
        perturbation_dataset: Data for the ``"dataset"`` perturbation.
        perturbation_scope: ``"trainable"`` (default, the training's perturbation) or
            ``"attributed"`` (the final layer's weight alone, an approximation; the
            features are then the same at both points, and when the layer's output
            is the model's, the gradients at :math:`w_c + \epsilon_c` come from the
            features at :math:`w_c` with no second forward pass).
        test_at_perturbed: Take the test gradient at the perturbed weights too.
        batchnorm_tolerance: For models with BatchNorm (whose gradients here are taken
            with the running statistics, as :class:`~captum_sam.SAMTracInCP`'s
            ``batchnorm="eval"``): warn (``UserWarning``) at every checkpoint where the
            mean loss in eval mode and in train mode differ by more than this fraction,
            on up to four training batches; ``None`` skips the check.

    Where the gradients are taken: the test example's at :math:`w_c`, the training
    example's at :math:`w_c + \epsilon_c`, both with respect to the final layer's
    weight, every other parameter held at its (perturbed) value.
    """

    def __init__(
        self,
        model: nn.Module,
        final_fc_layer: nn.Module | str,
        train_dataset: Dataset | DataLoader,
        checkpoints: str | os.PathLike[str] | Sequence[str] | Iterable[str],
        checkpoints_load_func: Callable[[nn.Module, str], float] = checkpoints_load_func,
        loss_fn: Callable[..., Tensor] | None = None,
        batch_size: int | None = 64,
        test_loss_fn: Callable[..., Tensor] | None = None,
        vectorize: bool = False,
        *,
        rho: float | None = None,
        adaptive: bool | None = None,
        perturbation: str = "dataset",
        perturbation_dataset: Dataset | DataLoader | None = None,
        perturbation_scope: str = "trainable",
        test_at_perturbed: bool = False,
        batchnorm_tolerance: float | None = 0.1,
    ) -> None:
        self._captum_init(
            model, train_dataset, checkpoints,
            {"checkpoints_load_func": checkpoints_load_func, "loss_fn": loss_fn,
             "batch_size": batch_size, "test_loss_fn": test_loss_fn},
            rho, adaptive,
        )  # fmt: skip
        if loss_fn is None:
            raise ArgumentError("loss function must not be none: pass a reducing `loss_fn`")
        name, module = final_layer(model, final_fc_layer)
        self.final_fc_layer = module
        self.vectorize = vectorize
        options = GIFOptions(
            perturbation, perturbation_dataset, perturbation_scope, test_at_perturbed,
            batchnorm_tolerance=batchnorm_tolerance,
        )  # fmt: skip
        self._engines = build_engines(
            self, train_dataset, [name], True,  # Captum's TracInCPFast: reducing losses only
            options, PERTURBATIONS, self._checkpoint_terms,
            final_checkpoint=self.checkpoints[-1],
            names=[f"{name}.weight" if name else "weight"],
        )  # fmt: skip
