"""The settings of ``captum-sam compare``, checked before any work (no torch imported).

:class:`CompareConfig` holds and validates every setting, so that a bad command line
is refused in well under a second, before the data are loaded or training starts;
:data:`METHODS` names the estimators a run can compare and :data:`QUICK` the small
settings of ``--quick``. Errors name both the field and its command-line flag.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

__all__ = [
    "METHODS",
    "HESSIAN_FAMILY",
    "GROUND_TRUTHS",
    "PROTOCOLS",
    "LDS_SAMPLERS",
    "DATASETS",
    "MODEL_NAMES",
    "CURVATURES",
    "DIGITS_SIZE",
    "SYNTHETIC_CIFAR_SIZE",
    "IMAGE_SHAPES",
    "QUICK",
    "check_model_data",
    "default_n_test",
    "default_lr",
    "default_methods",
    "CNN_MODELS",
    "CompareConfig",
]

METHODS: dict[str, str] = {
    "sam-gif": "SAM-GIF, trajectory form: real batch membership and learning rates",
    "sam-gif-ckpt": "SAM-GIF, checkpoint form on the epoch checkpoints (eta_c/|B| each)",
    "sam-hif-fast": "SAM-HIF(Fast), Theorem 4.3",
    "sam-hif": "SAM-HIF, Theorem 4.5 (non-symmetric)",
    "sam-hif-exact": "SAM-HIF(exact), the full first-order derivative (docs/math.rst)",
    "if": "plain influence function at the same weights (Koh & Liang)",
    "captum-tracincp": "Captum TracInCP on the same epoch checkpoints",
    "captum-arnoldi": "Captum ArnoldiInfluenceFunction at the same weights",
}
HESSIAN_FAMILY = {
    "sam-hif-fast": "fast",
    "sam-hif": "full",
    "sam-hif-exact": "exact",
    "if": "plain",
}
PROTOCOLS: dict[str, str] = {
    "fixed_point": "full-batch SAM fixed point of the mean loss over the kept examples "
    "(Newton from the trained weights)",
    "schedule": "recorded SAM schedule replayed, each batch the mean over its kept examples, "
    "a batch left empty skipped",
    "fresh": "SAM retraining from the recorded initial weights on the kept examples with "
    "new seeded batch orders, results averaged over the seeds",
    "fixed_point_zero_weight": "full-batch SAM fixed point with the removed examples "
    "weighted 0 and the 1/n normalisation kept",
    "schedule_zero_weight": "recorded SAM schedule replayed with the removed examples "
    "weighted 0, each batch still divided by its full size |B_t|",
}
"""Every ground-truth protocol and a one-line description (report, ``--help``)."""
GROUND_TRUTHS = ("auto", *PROTOCOLS)
LDS_SAMPLERS = ("fraction", "bernoulli")
DATASETS = ("digits", "synthetic-cifar", "mnist", "cifar10")
MODEL_NAMES = ("logreg", "mlp", "cnn", "convnet", "resnet18")  # captum_sam.models.MODELS
CURVATURES = ("hessian", "ggn", "kfac", "ekfac", "both")  # both: hessian and ggn
DIGITS_SIZE = 1797  # images in scikit-learn's bundled digits
SYNTHETIC_CIFAR_SIZE = 10_000  # captum_sam.data.SYNTHETIC_CIFAR_SIZE
IMAGE_SHAPES = {
    "digits": (1, 8, 8),
    "synthetic-cifar": (3, 32, 32),
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
"""``(channels, height, width)`` of one image of each data set."""
ON_DISK = ("mnist", "cifar10")  # read from torchvision's files in --data-dir


CNN_MODELS = ("convnet", "resnet18")
CNN_METHODS = ("sam-gif", "sam-gif-ckpt", "captum-tracincp")


KRONECKER_CNN_METHODS = ("sam-hif-fast", "if")
"""Added to :data:`CNN_METHODS` on ``convnet`` with ``--curvature kfac``/``ekfac``."""


def default_methods(model: str, curvature: str = "hessian") -> tuple[str, ...]:
    r"""The rows of a run without ``--methods``: all of :data:`METHODS`, fewer on a CNN.

    On ``convnet`` (83k parameters) and ``resnet18`` (11.2M) a dense :math:`P \times P`
    curvature cannot be formed, and the Hessian rows (``sam-hif*``, ``if``) fall back to
    an iterative solver (conjugate gradients, GMRES), one system per test, validation
    and training example; they and Captum's Arnoldi (200 Hessian-vector products over
    the data) did not finish within 10 minutes on 60 training examples of convnet on
    2 CPU cores, where the three gradient rows took 3-4 s each. So the default on a CNN
    is the gradient rows :data:`CNN_METHODS`; the others still run when named in
    ``--methods``. With a Kronecker curvature (``kfac``, ``ekfac``) the symmetric rows
    ``sam-hif-fast`` and ``if`` are inverted exactly in each layer's eigenbasis (no
    solver), so ``convnet`` runs them too (:data:`KRONECKER_CNN_METHODS`); ``resnet18``
    does not (its BatchNorm parameters have no Kronecker factors), nor do the
    non-symmetric ``sam-hif``/``sam-hif-exact`` (GMRES over the data).
    """
    if model not in CNN_MODELS:
        return tuple(METHODS)
    if model == "convnet" and curvature in ("kfac", "ekfac"):
        return CNN_METHODS + KRONECKER_CNN_METHODS
    return CNN_METHODS


def default_lr(model: str) -> float:
    """SAM's learning rate when ``--lr`` is not given: 0.1 for the ReLU CNNs, else 0.5.

    At 0.5 the ReLU networks (``convnet``, ``resnet18``) diverge or die on
    synthetic-cifar (``convnet``: chance accuracy after 10 epochs; at 0.1, 91% test
    accuracy after 5 epochs on 500 examples).
    """
    return 0.1 if model in CNN_MODELS else 0.5


def default_n_test(dataset: str) -> int | None:
    """Test examples when ``--n-test`` is not given: the rest of digits, else 1000.

    ``synthetic-cifar`` takes 200, so that attributing every test example stays cheap
    on a CPU (the Hessian rows solve one system per test example on a CNN).
    """
    return {"digits": None, "synthetic-cifar": 200}.get(dataset, 1000)


def check_model_data(model: str, dataset: str, data_dir: str | None) -> None:
    """Refuse a model and data set that do not go together, before any work.

    ``resnet18`` (its stem made for 32x32 images, 11 million parameters) is refused on
    the 8x8 digits; MNIST and CIFAR-10 need their files in ``--data-dir``.

    Raises:
        ValueError: The message names the flags and what would work.
    """
    for field, value, valid in (("model", model, MODEL_NAMES), ("dataset", dataset, DATASETS)):
        if value not in valid:
            raise ValueError(f"{_name(field)} must be one of {', '.join(valid)}; got {value!r}")
    if dataset in ON_DISK and data_dir is None:
        raise ValueError(
            f"dataset {dataset!r} needs --data-dir with its files (or use --dataset "
            "synthetic-cifar, generated, no files needed)"
        )
    if dataset not in ON_DISK and data_dir is not None:
        raise ValueError(
            f"--data-dir is read for mnist and cifar10 only; dataset {dataset!r} uses no "
            "files (leave --dataset out to detect it from --data-dir)"
        )
    if model == "resnet18" and dataset == "digits":
        raise ValueError(
            "--model resnet18 is made for 32x32 images (11 million parameters) and the "
            "digits are 8x8 with 1797 images: use --dataset synthetic-cifar, cifar10 or "
            "mnist, or a small model (logreg, mlp, cnn, convnet) on digits"
        )


QUICK = dict(
    n_train=200,
    n_val=100,
    n_test=150,
    epochs=10,
    n_loo=12,
    lds_subsets=6,
    removal_fractions=(0.0, 0.1, 0.2),
    trace_examples=3,
    trace_k=3,
)


def _name(field: str) -> str:
    """``field`` as the error names it: the attribute and its ``captum-sam`` flag."""
    return f"`{field}` (--{field.replace('_', '-')})"


@dataclass(frozen=True)
class CompareConfig:
    """Settings of one comparison (validated on construction, before any work)."""

    model: str = "logreg"
    dataset: str = "digits"
    data_dir: str | None = None
    n_train: int = 1000
    n_val: int = 300
    n_test: int | None = None
    noise: float = 0.1
    rho: float = 0.05
    adaptive: bool = False
    epochs: int = 30
    lr: float | None = None  # None: default_lr(model)
    batch_size: int = 64
    weight_decay: float = 1e-3
    damping: float | str = "auto"  # "auto": captum_sam.hif.damping's rule per row
    curvature: str = "hessian"
    ground_truth: str = "auto"
    gt_seeds: tuple[int, ...] = (0, 1, 2)  # batch-order seeds of the "fresh" ground truth
    lds_sampler: str = "fraction"
    n_loo: int = 40
    lds_subsets: int = 20
    lds_fraction: float = 0.5
    removal_fractions: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
    removal_repeats: int = 3  # random removals averaged per fraction (one is too noisy)
    mislabel_by: str = "influence"
    methods: tuple[str, ...] | None = None  # None: default_methods(model)
    seed: int = 0
    trace_examples: int = 4
    trace_k: int = 4

    def __post_init__(self) -> None:
        if self.lr is None:
            object.__setattr__(self, "lr", default_lr(self.model))
        if self.methods is None:
            object.__setattr__(self, "methods", default_methods(self.model, self.curvature))
        self._check_choices()
        self._check_numbers()
        self._check_sizes()
        if self.ground_truth.startswith("fixed_point") and self.model != "logreg":
            from captum_sam.core.errors import user_stacklevel  # (no torch before --help)

            warnings.warn(
                "the fixed-point ground truth assumes a convex model (logreg)",
                stacklevel=user_stacklevel(),
            )

    def _check_choices(self) -> None:
        for field, valid in (
            ("model", MODEL_NAMES),
            ("dataset", DATASETS),
            ("curvature", CURVATURES),
            ("ground_truth", GROUND_TRUTHS),
            ("lds_sampler", LDS_SAMPLERS),
            ("mislabel_by", ("influence", "self")),
        ):
            if getattr(self, field) not in valid:
                raise ValueError(
                    f"{_name(field)} must be one of {', '.join(valid)}; "
                    f"got {getattr(self, field)!r}"
                )
        check_model_data(self.model, self.dataset, self.data_dir)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(
                f"unknown method(s) {unknown}; valid methods are: {', '.join(METHODS)}"
            )
        twice = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if twice:
            raise ValueError(f"{_name('methods')} lists {twice} more than once")

    def _check_numbers(self) -> None:
        for field in (
            "n_train",
            "n_val",
            "epochs",
            "batch_size",
            "trace_examples",
            "trace_k",
            "removal_repeats",
        ):
            if getattr(self, field) < 1:
                raise ValueError(f"{_name(field)} must be >= 1, got {getattr(self, field)}")
        if self.n_test is not None and self.n_test < 1:
            raise ValueError(f"{_name('n_test')} must be >= 1, got {self.n_test}")
        if isinstance(self.damping, str) and self.damping != "auto":
            raise ValueError(f"{_name('damping')} must be 'auto' or a number, got {self.damping!r}")
        for field in ("rho", "damping", "weight_decay", "noise", "lr"):
            value = getattr(self, field)
            if field == "damping" and value == "auto":
                continue
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{_name(field)} must be a finite number >= 0, got {value}")
        if self.lr == 0:
            raise ValueError(f"{_name('lr')} must be > 0")
        if not self.noise < 1:
            raise ValueError(f"{_name('noise')} is a fraction of labels, in [0, 1)")
        if not 0 < self.lds_fraction < 1:
            raise ValueError(f"{_name('lds_fraction')} must be in (0, 1), got {self.lds_fraction}")
        if self.lds_subsets < 3:
            raise ValueError(f"{_name('lds_subsets')} must be >= 3 (a rank correlation over them)")
        if not self.gt_seeds or len(set(self.gt_seeds)) != len(self.gt_seeds):
            raise ValueError(f"{_name('gt_seeds')} must be distinct seeds, got {self.gt_seeds}")
        for field, seeds in (("seed", (self.seed,)), ("gt_seeds", self.gt_seeds)):
            if any(not 0 <= x < 2**63 for x in seeds):
                got = getattr(self, field)
                raise ValueError(f"{_name(field)} must be in [0, 2**63), got {got}")
        if self.n_loo < 3:
            raise ValueError(f"{_name('n_loo')} must be >= 3 (a correlation over them)")
        if any(not 0 <= f < 1 for f in self.removal_fractions):
            raise ValueError(f"removal fractions must be in [0, 1), got {self.removal_fractions}")

    def _check_sizes(self) -> None:
        n = self.n_train
        if self.n_loo > n:
            raise ValueError(
                f"{_name('n_loo')} = {self.n_loo} removes more examples than "
                f"{_name('n_train')} = {n} holds; lower --n-loo or raise --n-train"
            )
        if round(self.lds_fraction * n) < 1 or round(self.lds_fraction * n) >= n:
            raise ValueError(
                f"LDS subsets of {self.lds_fraction:.0%} of {n} training examples keep "
                f"{round(self.lds_fraction * n)}: raise --n-train or change --lds-fraction"
            )
        noisy = round(self.noise * n)
        if self.noise > 0 and noisy < 1:
            raise ValueError(
                f"{_name('noise')} = {self.noise} of {_name('n_train')} = {n} plants no noisy "
                "label, and the mislabel metrics (AUC, recall, the removal curve) need at "
                f"least one: use --noise >= {1 / n:.3g} or more training examples (or "
                "--noise 0 to skip those metrics)"
            )
        smallest = min((f for f in self.removal_fractions if f > 0), default=None)
        if smallest is not None and self.noise > 0 and round(smallest * n) < 1:
            raise ValueError(
                f"the removal curve's first step removes {smallest:.0%} of {n} training "
                "examples, none at all: raise --n-train"
            )
        if self.dataset == "digits":
            test = "1 (the rest)" if self.n_test is None else str(self.n_test)
            used = n + self.n_val + (self.n_test or 1)
            if used > DIGITS_SIZE:
                raise ValueError(
                    f"n_train + n_val + n_test = {n} + {self.n_val} + {test} = {used} exceeds "
                    f"the {DIGITS_SIZE} images of digits: lower --n-train, --n-val or --n-test"
                )
        if self.dataset == "synthetic-cifar":
            test = self.resolved_n_test
            used = n + self.n_val + test  # type: ignore[operator]
            if used > SYNTHETIC_CIFAR_SIZE:
                raise ValueError(
                    f"n_train + n_val + n_test = {n} + {self.n_val} + {test} = {used} exceeds "
                    f"the {SYNTHETIC_CIFAR_SIZE} examples synthetic-cifar generates: lower "
                    "--n-train, --n-val or --n-test"
                )

    @property
    def resolved_n_test(self) -> int | None:
        """``n_test``, or the data set's default (``None``: the rest of digits)."""
        return default_n_test(self.dataset) if self.n_test is None else self.n_test

    @property
    def resolved_ground_truth(self) -> str:
        """``fixed_point`` for the convex logistic regression, else ``schedule``."""
        if self.ground_truth != "auto":
            return self.ground_truth
        return "fixed_point" if self.model == "logreg" else "schedule"

    def rows(self) -> list[tuple[str, str, str | None]]:
        """``(row label, method, curvature)`` for every table row."""
        curvatures = ["hessian", "ggn"] if self.curvature == "both" else [self.curvature]
        out: list[tuple[str, str, str | None]] = []
        for m in self.methods:
            if m in HESSIAN_FAMILY:
                for c in curvatures:
                    label = m if len(curvatures) == 1 else f"{m} [{c}]"
                    out.append((label, m, c))
            else:
                out.append((m, m, None))
        return out
