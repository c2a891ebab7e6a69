import pytest

from captum_sam.cli import main
from captum_sam.trajectory import load_trajectory


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_train_command_records_a_trajectory(tmp_path, capsys, model):
    out = tmp_path / model
    code = main(
        [
            "train",
            "--model",
            model,
            "--epochs",
            "10",
            "--n-train",
            "200",
            "--noise",
            "0.1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "200 train (20 noisy labels)" in text
    acc = float(text.split("test accuracy: ")[1].split()[0])
    assert acc > 0.5  # far above the 0.1 of chance after ten epochs
    traj = load_trajectory(out)
    assert traj.complete and traj.n_train == 200 and len(traj.checkpoints) == 10


def test_train_command_reports_bad_arguments(tmp_path, capsys):
    assert main(["train", "--rho", "-1", "--epochs", "1", "--out", str(tmp_path)]) == 2
    assert "rho" in capsys.readouterr().err


def test_train_command_on_a_convnet_and_the_generated_cifar(tmp_path, capsys):
    out = tmp_path / "convnet"
    argv = ["train", "--model", "convnet", "--dataset", "synthetic-cifar", "--n-train", "40"]
    code = main([*argv, "--epochs", "2", "--batch-size", "20", "--no-progress", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "SAM training convnet on synthetic-cifar: 40 examples" in text
    assert "data: synthetic-cifar, 40 train (0 noisy labels), 300 validation, 200 test" in text
    traj = load_trajectory(out)
    assert traj.complete and traj.n_train == 40 and len(traj.checkpoints) == 2
    assert len(traj.steps) == 4 and traj.steps[0].lr == 0.1  # the CNNs' default lr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "resnet18"], "--model resnet18 is made for 32x32 images"),
        (["--dataset", "cifar10"], "needs --data-dir"),
        (["--dataset", "synthetic-cifar", "--n-train", "9600"], "--n-train must be in [1, 9500]"),
    ],
)
def test_train_refuses_models_and_data_that_do_not_fit(tmp_path, capsys, argv, message):
    assert main(["train", *argv, "--out", str(tmp_path / "t")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
