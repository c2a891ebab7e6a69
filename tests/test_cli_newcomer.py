"""The command as a newcomer meets it: fast help, clear refusals, progress, failed estimators."""

import contextlib
import io
import json
import subprocess
import sys

import pytest

import captum_sam.evaluation.compare as compare_module
from captum_sam.cli import build_parser, main
from captum_sam.evaluation.config import MODEL_NAMES, CompareConfig
from captum_sam.models import MODELS


def run_without_torch(argv):
    """Run ``captum-sam argv`` in a fresh interpreter; also say whether torch was imported."""
    code = (
        "import sys\n"
        "from captum_sam.cli import main\n"
        "try:\n"
        f"    status = main({argv!r})\n"
        "except SystemExit as stop:\n"
        "    status = stop.code\n"
        "print('TORCH-IMPORTED' if 'torch' in sys.modules else 'NO-TORCH', status)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return done.stdout, done.stderr


@pytest.mark.parametrize("sub", [[], ["train"], ["compare"]])
def test_help_answers_without_importing_torch(sub):
    out, _ = run_without_torch([*sub, "--help"])
    assert out.rstrip().endswith("NO-TORCH 0")
    assert "usage: captum-sam" in out
    if sub == ["compare"]:
        # the options a newcomer asked about, each with its meaning and default
        for text in ("--dataset", "mnist", "--data-dir", "--quick", "exit status"):
            assert text in out
        assert "(default: 0.05)" in out and "(default: runs/compare)" in out
        assert "under a minute" not in out


def test_a_bad_invocation_is_refused_in_one_line_before_torch(tmp_path):
    out, err = run_without_torch(["compare", "--n-train", "5", "--out", str(tmp_path / "o")])
    assert out.rstrip().endswith("NO-TORCH 2")
    assert err.startswith("captum-sam: error: ") and err.count("\n") == 1
    assert "`n_loo` (--n-loo) = 40" in err and "--n-train" in err
    assert not (tmp_path / "o").exists()


def test_every_option_has_help_text_and_shows_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert subparsers["train"].description and subparsers["compare"].description
    for name, sub in subparsers.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, (name, action.dest)
            shown = formatter._get_help_string(action)
            has_value = action.default is not None and action.default is not False
            assert ("default" in shown) == has_value or "default" in action.help, (
                name,
                action.dest,
                shown,
            )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n-train", "5"], "removes more examples than"),
        (["--n-train", "5", "--n-loo", "3"], "plants no noisy label"),
        (["--quick", "--noise", "0.001"], "use --noise >= 0.005"),
        (["--quick", "--noise", "1"], "in [0, 1)"),
        (["--quick", "--rho", "nan"], "finite number >= 0"),
        (["--quick", "--lds-fraction", "1"], "(0, 1)"),
        (["--quick", "--n-train", "1700"], "exceeds the 1797 images of digits"),
        (["--quick", "--n-val", "0"], "`n_val` (--n-val) must be >= 1"),
        (["--quick", "--lds-subsets", "2"], "must be >= 3"),
    ],
)
def test_compare_validates_arguments_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(compare_module, "run_compare", forbidden)
    assert main(["compare", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "o").exists()


def test_train_validates_arguments_before_any_work(tmp_path, capsys):
    assert main(["train", "--n-train", "5000", "--out", str(tmp_path / "t")]) == 2
    assert "--n-train must be in [1, 1496]" in capsys.readouterr().err
    assert main(["train", "--noise", "1.5", "--out", str(tmp_path / "t")]) == 2
    assert "--noise" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_config_model_names_match_the_models_module():
    assert MODEL_NAMES == MODELS


def test_zero_noise_is_allowed_and_the_config_skips_nothing_else():
    config = CompareConfig(noise=0.0, n_train=50, n_loo=3)
    assert config.noise == 0.0 and config.rows()


TINY = [
    "compare",
    "--n-train",
    "60",
    "--n-val",
    "40",
    "--n-test",
    "40",
    "--epochs",
    "2",
    "--n-loo",
    "3",
    "--lds-subsets",
    "3",
    "--noise",
    "0.1",
    "--methods",
    "if,captum-tracincp,sam-gif",
]


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory):
    """A tiny compare run in which one estimator raises; bars off, step lines on."""
    out = tmp_path_factory.mktemp("failing") / "cmp"
    real = compare_module.build_estimator

    def build(ctx, method, curvature, show_progress=False):
        if method == "captum-tracincp":
            raise RuntimeError("simulated failure inside the estimator")
        return real(ctx, method, curvature, show_progress=show_progress)

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr(compare_module, "build_estimator", build)
        status = main([*TINY, "--no-progress", "--out", str(out)])
    capture = {"status": status, "stdout": stdout.getvalue()}
    return out, capture


@pytest.mark.slow
def test_a_failing_estimator_is_reported_in_its_row_and_the_report_is_written(failing_run):
    out, capture = failing_run
    assert capture["status"] == 3
    results = json.loads((out / "results.json").read_text())
    rows = {r["label"]: r for r in results["methods"]}
    failed = rows["captum-tracincp"]
    assert failed["error"] == "RuntimeError: simulated failure inside the estimator"
    assert "Traceback" in failed["traceback"] and "loo_pearson" not in failed
    for label in ("if", "sam-gif"):  # the others ran and were scored
        assert -1 <= rows[label]["loo_pearson"] <= 1
    report = (out / "report.md").read_text()
    assert "simulated failure inside the estimator" in report
    assert "FAILED" in capture["stdout"] and "simulated failure" in capture["stdout"]
    assert (out / "loo_scatter.png").stat().st_size > 1000


@pytest.mark.slow
def test_no_progress_keeps_the_step_lines(failing_run):
    _, capture = failing_run
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "(1/3) if", "(3/3) sam-gif"):
        assert step in capture["stdout"], step


@pytest.mark.slow
def test_progress_bars_cover_every_long_step(tmp_path, capsys):
    out = tmp_path / "bars"
    argv = [*TINY, "--methods", "if,captum-arnoldi", "--out", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    for bar in (
        "SAM training",  # step 1
        "LOO retraining",  # step 2
        "LDS subset retraining",
        "edit-set retraining",
        "Using SAMInfluenceFunction to solve",  # step 3: our estimator's set-up
        "Using SAMInfluenceFunction to compute self influence",
        "Running Arnoldi Iteration",  # step 3: Captum's Arnoldi set-up
        "Using ArnoldiInfluenceFunction to compute train_dataset",
        "harmful-data removal",  # step 4
    ):
        assert bar in err, bar
    assert "torch.jit.script" not in err


def test_forward_ad_prints_no_torch_jit_deprecation_notice():
    # in a fresh interpreter: torch loads the decompositions (and warns) only once
    code = (
        "import warnings\n"
        "import torch\n"
        "import captum_sam.core\n"
        "from torch.func import grad, jvp\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    f = lambda w: (w ** 3).sum()\n"
        "    w = torch.ones(3, dtype=torch.float64)\n"
        "    print(jvp(grad(f), (w,), (w,))[1].tolist())\n"
        "print([str(c.message) for c in caught if 'jit' in str(c.message)])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[6.0, 6.0, 6.0]", "[]"]
    assert "torch.jit.script" not in done.stderr


def test_cnn_runs_default_to_the_rows_that_scale_and_the_cnn_learning_rate():
    from captum_sam.evaluation.config import CNN_METHODS, METHODS

    config = CompareConfig(model="convnet", dataset="synthetic-cifar")
    assert config.methods == CNN_METHODS and config.lr == 0.1
    assert not set(config.methods) & {"sam-hif-fast", "sam-hif", "sam-hif-exact", "if"}
    assert CompareConfig(model="mlp").methods == tuple(METHODS)
    assert CompareConfig(model="mlp").lr == 0.5
    chosen = CompareConfig(model="convnet", dataset="synthetic-cifar", methods=("if",), lr=0.3)
    assert chosen.methods == ("if",) and chosen.lr == 0.3
    assert config.resolved_n_test == 200
    # Kronecker curvatures invert the symmetric rows exactly: convnet runs them too
    kron = CompareConfig(model="convnet", dataset="synthetic-cifar", curvature="ekfac")
    assert kron.methods == (*CNN_METHODS, "sam-hif-fast", "if")
    resnet = CompareConfig(model="resnet18", dataset="synthetic-cifar", curvature="kfac")
    assert resnet.methods == CNN_METHODS  # BatchNorm parameters have no Kronecker factors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "resnet18"], "--model resnet18 is made for 32x32 images"),
        (["--dataset", "mnist"], "needs --data-dir"),
        (
            ["--dataset", "synthetic-cifar", "--n-train", "9000", "--n-val", "900"],
            "exceeds the 10000 examples synthetic-cifar generates",
        ),
    ],
)
def test_compare_refuses_cnn_settings_that_do_not_fit(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(compare_module, "run_compare", lambda *a, **k: pytest.fail("work began"))
    assert main(["compare", *argv, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("curvature", [None, "ekfac"])
def test_a_tiny_compare_on_a_convnet(tmp_path, capsys, curvature):
    out = tmp_path / "cnn"
    argv = [*TINY[:-2], "--model", "convnet", "--dataset", "synthetic-cifar", "--epochs", "1"]
    if curvature is not None:
        argv += ["--curvature", curvature]
    assert main([*argv, "--n-test", "10", "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"] == {
        "name": "synthetic-cifar",
        "n_train": 60,
        "n_val": 40,
        "n_test": 10,
        "noisy": 6,
    }
    labels = [r["label"] for r in results["methods"]]
    gradient_rows = ["sam-gif", "sam-gif-ckpt", "captum-tracincp"]
    assert labels == gradient_rows + ([] if curvature is None else ["sam-hif-fast", "if"])
    for row in results["methods"]:
        assert "error" not in row and -1 <= row["loo_pearson"] <= 1
    assert results["config"]["lr"] == 0.1
    assert "convnet on synthetic-cifar" in capsys.readouterr().out
