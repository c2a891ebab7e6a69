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
