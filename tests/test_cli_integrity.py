"""`captum-sam` refuses to mix runs in one --out and reports OS errors on one line."""

import errno
import json
import os
import re
from pathlib import Path

import pytest

import captum_sam.data
import captum_sam.evaluation.compare
import captum_sam.training
from captum_sam import outdir, train_sam
from captum_sam.cli import main
from captum_sam.evaluation.config import PROTOCOLS
from captum_sam.evaluation.ground_truth import GroundTruth
from captum_sam.outdir import clean_out_dir, compare_layout, train_layout
from captum_sam.record_schema import FORMAT
from captum_sam.trajectory import load_trajectory
from tests.helpers import ce_loss, make_data, mlp_model

TRAIN = ["train", "--epochs", "2", "--n-train", "100"]
COMPARE = ["compare", "--quick", "--no-progress"]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (itself included) with its kind, mtime and bytes."""
    state = {".": ("dir", root.stat().st_mtime_ns, None)}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if path.is_file() else None
        state[str(path.relative_to(root))] = (path.is_dir(), st.st_mtime_ns, content)
    return state


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("captum-sam: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def forbid(monkeypatch, module, name):
    """Make ``module.name`` fail the test if the command reaches it."""

    def called(*args, **kwargs):
        raise AssertionError(f"{name} ran although the command should have stopped before")

    monkeypatch.setattr(module, name, called)


def populate_compare_dir(out: Path) -> None:
    """What an earlier `compare` leaves in ``out``, plus files of the user."""
    (out / "trajectory").mkdir(parents=True)
    (out / "cache").mkdir()
    for name in ("report.md", "results.json", "fixed_point.pt", "loo_scatter.png"):
        (out / name).write_text("old")
    for name in ("mislabel_recall.png", "harmful_removal.png", "trace.png"):
        (out / name).write_text("old")
    for name in ("initial.pt", "step_00000002.pt", "step_00000004.pt", ".tmp-x1.part"):
        (out / "trajectory" / name).write_text("old")
    (out / "trajectory" / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    key = out / "cache" / f"schedule-{'a' * 24}"
    key.mkdir()
    for name in ("manifest.json", f"row-{'b' * 32}.pt", f"row-{'c' * 32}.pt", ".tmp-z3.part"):
        (key / name).write_text("gt")
    (out / "cache" / f"fixed_point-{'d' * 20}-{'b' * 12}-{'c' * 16}.pt").write_text("legacy")
    (out / "cache" / ".tmp-y2.part").write_text("half")
    (out / "notes.txt").write_text("mine")  # the user's files
    (out / "my_plot.png").write_text("mine")
    (out / "drafts").mkdir()
    (out / "drafts" / "report.md").write_text("mine")


# --------------------------------------------------------------------------- train


def test_train_refuses_a_non_empty_out_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    forbid(monkeypatch, captum_sam.data, "load_digits_data")
    forbid(monkeypatch, captum_sam.training, "train_sam")
    assert main([*TRAIN, "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert f"--out {str(out)!r} is not empty (manifest.json, notes.txt)" in err
    assert "--overwrite" in err
    assert snapshot(out) == before


def test_train_overwrite_replaces_only_the_earlier_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()  # an existing empty directory is fine
    assert main([*TRAIN, "--out", str(out)]) == 0
    assert {"manifest.json", "initial.pt", "step_00000002.pt", "step_00000004.pt"} <= files(out)
    (out / "notes.txt").write_text("mine")
    (out / "initial_weights.pt").write_text("mine")  # not a name the recorder writes
    (out / ".tmp-killed.part").write_text("half")
    capsys.readouterr()

    assert main([*TRAIN[:2], "1", *TRAIN[3:], "--out", str(out), "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "captum-sam: --overwrite: removed" in err
    assert "kept 2 other entries: initial_weights.pt, notes.txt" in err
    # one epoch of 100 examples in batches of 64: steps 1..2, no checkpoint of the old run
    assert files(out) == {
        "manifest.json",
        "initial.pt",
        "step_00000002.pt",
        "notes.txt",
        "initial_weights.pt",
    }
    assert (out / "notes.txt").read_text() == "mine"
    traj = load_trajectory(out)
    assert traj.complete and len(traj.steps) == 2 and len(traj.checkpoints) == 1


def test_train_overwrite_removes_what_the_manifest_names_and_nothing_outside(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    manifest = {
        "format": FORMAT,
        "initial": {"file": "w0.pt"},
        "checkpoints": [{"file": "epoch_1.pt"}, {"file": "../outside.pt"}, {"file": "notes.txt"}],
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    for name in ("w0.pt", "epoch_1.pt", "notes.txt", "step_00000007.pt", "step_x.pt"):
        (out / name).write_text("x")
    (tmp_path / "outside.pt").write_text("mine")
    cleaned = clean_out_dir(str(out), train_layout())
    assert sorted(cleaned.removed) == ["epoch_1.pt", "manifest.json", "step_00000007.pt", "w0.pt"]
    assert cleaned.kept == ["notes.txt", "step_x.pt"]
    assert files(out) == {"notes.txt", "step_x.pt"}
    assert (tmp_path / "outside.pt").read_text() == "mine"


def test_train_overwrite_keeps_a_manifest_and_checkpoint_names_that_are_not_a_record(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"project": "not a trajectory"}))
    for name in ("initial.pt", "step_1.pt", ".tmp-x1.part"):
        (out / name).write_text("x")
    cleaned = clean_out_dir(str(out), train_layout())
    assert cleaned.removed == [".tmp-x1.part"]  # a killed writer's temporary only
    assert files(out) == {"initial.pt", "manifest.json", "step_1.pt"}


def test_compare_overwrite_removes_its_own_killed_temporaries(tmp_path):
    from captum_sam.outdir import compare_layout

    out = tmp_path / "cmp"
    out.mkdir()
    for name in (".tmp-2ljv1jhe.part", "results.json", "notes.txt"):
        (out / name).write_text("x")
    cleaned = clean_out_dir(str(out), compare_layout())
    assert sorted(cleaned.removed) == [".tmp-2ljv1jhe.part", "results.json"]
    assert cleaned.kept == ["notes.txt"]


# --------------------------------------------------------------------------- compare


def test_compare_refuses_a_non_empty_out_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    populate_compare_dir(out)
    before = snapshot(out)
    forbid(monkeypatch, captum_sam.evaluation.compare, "run_compare")
    assert main([*COMPARE, "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert f"--out {str(out)!r} is not empty (cache, drafts, fixed_point.pt," in err
    assert "and 7 more); pass --overwrite" in err
    assert snapshot(out) == before


def test_compare_overwrite_cleans_before_the_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    populate_compare_dir(out)
    seen = {}

    def fake_run_compare(config, out_dir, show_progress=True, cache_dir=None):
        seen["files"] = files(Path(out_dir))
        raise RuntimeError("stop here: the comparison itself is tested in test_compare.py")

    from captum_sam.outdir import OUT_LOCK

    monkeypatch.setattr(captum_sam.evaluation.compare, "run_compare", fake_run_compare)
    with pytest.raises(RuntimeError, match="stop here"):
        main([*COMPARE, "--out", str(out), "--overwrite"])
    key = f"cache/schedule-{'a' * 24}"
    assert not (out / OUT_LOCK).exists()  # released when the run failed
    assert seen["files"] == {
        OUT_LOCK,  # held while the run works
        "notes.txt",
        "my_plot.png",
        "drafts",
        "drafts/report.md",
        "cache",
        key,
        f"{key}/manifest.json",
        f"{key}/row-{'b' * 32}.pt",
        f"{key}/row-{'c' * 32}.pt",
    }
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "drafts" / "report.md").read_text() == "mine"
    err = capsys.readouterr().err
    assert f"removed 16 entries of an earlier run from {str(out)!r}" in err
    assert "kept 3 cache files for reuse" in err
    assert "kept 3 other entries: drafts/, my_plot.png, notes.txt" in err


def test_compare_cleaning_keeps_unknown_files_inside_its_subdirectories(tmp_path):
    out = tmp_path / "cmp"
    populate_compare_dir(out)
    (out / "trajectory" / "readme.txt").write_text("mine")
    cleaned = clean_out_dir(str(out), compare_layout())
    assert "trajectory/readme.txt" in cleaned.kept
    assert files(out / "trajectory") == {"readme.txt"}  # the folder stays, with it


def test_compare_layout_names_every_file_compare_writes():
    # a guard against drift: every os.path.join(out, "...") in compare and its report
    package = Path(captum_sam.evaluation.compare.__file__).parent
    layout = compare_layout()
    known = set(layout.names) | {name for name, _ in layout.subdirs}
    for source in ("compare.py", "report.py"):
        text = (package / source).read_text()
        written = re.findall(r'os\.path\.join\(\s*out,\s*"([^"]+)"', text)
        assert written and set(written) <= known, (source, set(written) - known)


def test_compare_layout_matches_a_real_trajectory_and_ground_truth_cache(tmp_path):
    # written by the real recorder and GroundTruth, so a change of their files shows here
    out, data = tmp_path / "cmp", make_data(n=12)
    record = out / "trajectory"
    train_sam(mlp_model(), data, ce_loss(), epochs=2, lr=0.2, rho=0.1, batch_size=4,
              record_dir=record)  # fmt: skip
    test = make_data(n=4, seed=1).tensors
    for mode in PROTOCOLS:  # every protocol's cache directory is recognised
        truth = GroundTruth(mlp_model(), data, ce_loss(), mode, rho=0.1, weight_decay=0.1,
                            trajectory=str(record), cache_dir=str(out / "cache"),
                            seeds=(0,))  # fmt: skip
        truth.evaluate([[3]], test)
    (out / "report.md").write_text("old")
    (out / "notes.txt").write_text("mine")
    cache_before = {f for f in files(out) if f.startswith("cache/")}
    cleaned = clean_out_dir(str(out), compare_layout())
    assert cleaned.kept == ["notes.txt"]
    assert {"report.md", "trajectory/", "trajectory/manifest.json"} <= set(cleaned.removed)
    assert {f for f in cache_before if not (out / f).is_dir()} == set(cleaned.reused)
    assert files(out) == {"notes.txt", "cache", *cache_before}


def test_compare_checks_the_cache_dir_before_any_work(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache-file"
    cache.write_text("not a folder")
    forbid(monkeypatch, captum_sam.evaluation.compare, "run_compare")
    argv = [*COMPARE, "--out", str(tmp_path / "cmp"), "--cache-dir", str(cache)]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert f"--cache-dir {str(cache)!r} exists and is not a directory" in err
    assert not (tmp_path / "cmp").exists() and cache.read_text() == "not a folder"


# --------------------------------------------------------------------------- OS errors


@pytest.mark.parametrize("command", [TRAIN, COMPARE])
def test_an_out_that_is_a_file_is_one_line_and_status_2(tmp_path, capsys, command):
    target = tmp_path / "results.txt"
    target.write_text("mine")
    before = snapshot(tmp_path)
    assert main([*command, "--out", str(target)]) == 2
    err = one_line_error(capsys)
    assert f"--out {str(target)!r} exists and is not a directory" in err
    assert main([*command, "--out", str(target / "sub")]) == 2
    assert f"--out {str(target / 'sub')!r} is not a writable directory" in one_line_error(capsys)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_an_unwritable_out_is_one_line_and_status_2(tmp_path, capsys, monkeypatch):
    out = tmp_path / "locked"
    out.mkdir()
    (out / "report.md").write_text("old")
    out.chmod(0o500)
    forbid(monkeypatch, captum_sam.evaluation.compare, "run_compare")
    try:
        assert main([*COMPARE, "--out", str(out), "--overwrite"]) == 2
        err = one_line_error(capsys)
        assert f"--out {str(out)!r} is not a writable directory (Permission denied)" in err
        assert (out / "report.md").read_text() == "old"  # nothing removed
        assert main([*TRAIN, "--out", str(out / "new")]) == 2
        assert "Permission denied" in one_line_error(capsys)
    finally:
        out.chmod(0o700)


def test_an_unwritable_out_as_root_too(tmp_path, capsys, monkeypatch):
    # the same path as above through a failing probe, so it also runs as root
    def denied(dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, "tmpx"))

    monkeypatch.setattr(outdir.tempfile, "TemporaryFile", denied)
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    forbid(monkeypatch, captum_sam.training, "train_sam")
    assert main([*TRAIN, "--out", str(out), "--overwrite"]) == 2
    err = one_line_error(capsys)
    assert f"--out {str(out)!r} is not a writable directory (Permission denied)" in err
    assert (out / "manifest.json").exists()  # checked before anything is removed


def test_an_os_error_during_the_run_is_one_line_and_status_1(tmp_path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x.pt"))

    monkeypatch.setattr(captum_sam.training, "train_sam", full_disk)
    assert main([*TRAIN, "--out", str(tmp_path / "run")]) == 1
    err = one_line_error(capsys)
    assert f"No space left on device: {str(tmp_path / 'run' / 'x.pt')!r}" in err


def test_bugs_keep_their_traceback_and_debug_shows_it_for_errors(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise KeyError("a programming error")

    monkeypatch.setattr(captum_sam.training, "train_sam", bug)
    with pytest.raises(KeyError):
        main([*TRAIN, "--out", str(tmp_path / "a")])
    target = tmp_path / "file"
    target.write_text("x")
    monkeypatch.setenv("CAPTUM_SAM_DEBUG", "1")
    with pytest.raises(outdir.UsageError) as info:
        main([*TRAIN, "--out", str(target)])
    assert isinstance(info.value.__cause__, NotADirectoryError)
    assert info.value.__cause__.filename == str(target)


def test_bad_training_settings_stop_before_overwrite_removes_anything(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    before = snapshot(out)
    assert main([*TRAIN, "--lr", "0", "--out", str(out), "--overwrite"]) == 2
    assert "--lr must be a finite number > 0, got 0.0" in one_line_error(capsys)
    for flag in ("--rho", "--weight-decay", "--lr"):  # inf passed `>= 0`
        assert main([*TRAIN, flag, "inf", "--out", str(out), "--overwrite"]) == 2
        assert f"{flag} must be a finite number" in one_line_error(capsys)
    assert main([*COMPARE, "--epochs", "0", "--out", str(out), "--overwrite"]) == 2
    assert "`epochs` (--epochs) must be >= 1, got 0" in one_line_error(capsys)
    assert snapshot(out) == before


def test_a_corrupt_data_dir_is_one_line_exit_2_and_compare_keeps_the_old_run(tmp_path, capsys):
    pytest.importorskip("torchvision")
    data = tmp_path / "data"
    (data / "cifar-10-batches-py").mkdir(parents=True)
    (data / "cifar-10-batches-py" / "data_batch_1").write_bytes(os.urandom(1000))
    args = ["--data-dir", str(data), "--model", "cnn"]
    assert main([*TRAIN, *args, "--out", str(tmp_path / "t")]) == 2
    err = one_line_error(capsys)
    assert f"cifar10 files under --data-dir {str(data)!r} could not be read" in err
    assert "download=True" not in err
    assert not (tmp_path / "t").exists()  # the --out it created is not left behind, empty
    out = tmp_path / "cmp"
    populate_compare_dir(out)
    before = snapshot(out)
    assert main([*COMPARE, *args, "--out", str(out), "--overwrite"]) == 2
    assert "could not be read" in one_line_error(capsys)
    after = snapshot(out)
    del before["."], after["."]  # the lock was taken (and removed) in it
    assert after == before  # checked before --overwrite removed the earlier run
    # a compressed-only MNIST download is not read (nothing is extracted or downloaded)
    raw = tmp_path / "gz" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    assert main([*TRAIN, "--data-dir", str(tmp_path / "gz"), "--out", str(tmp_path / "g")]) == 2
    assert "files extracted" in one_line_error(capsys)


def test_a_second_command_on_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys):
    from captum_sam.core.files import DirectoryLock
    from captum_sam.outdir import OUT_LOCK

    out = tmp_path / "run"
    with DirectoryLock(str(out), "another captum-sam train", OUT_LOCK):  # a running command
        for command in (TRAIN, COMPARE):
            assert main([*command, "--out", str(out), "--overwrite"]) == 2
            err = one_line_error(capsys)
            assert "being written by another process" in err and OUT_LOCK in err
        assert os.listdir(out) == [OUT_LOCK]  # nothing was written or removed
    (out / OUT_LOCK).write_text('{"host": "h", "pid": 1}')  # left by a killed command
    assert main([*TRAIN, "--out", str(out)]) == 0  # not held: taken, and not "content"
    assert OUT_LOCK not in os.listdir(out)


def test_dataset_data_dir_methods_and_seed_are_checked_before_any_work(tmp_path, capsys):
    out = tmp_path / "o"
    data = tmp_path / "data"
    (data / "MNIST" / "raw").mkdir(parents=True)
    for dataset in ("digits", "synthetic-cifar"):  # given explicitly: no files to read
        args = ["--dataset", dataset, "--data-dir", str(data), "--out", str(out)]
        assert main([*TRAIN, *args]) == 2
        assert "--data-dir is read for mnist and cifar10 only" in one_line_error(capsys)
    assert main([*COMPARE, "--methods", "sam-gif,if,sam-gif", "--out", str(out)]) == 2
    assert "lists ['sam-gif'] more than once" in one_line_error(capsys)
    for command in (TRAIN, COMPARE):
        assert main([*command, "--seed", str(2**64), "--out", str(out)]) == 2
        assert "must be in [0, 2**63)" in one_line_error(capsys)
    assert not out.exists()


def test_a_value_error_after_the_work_started_is_a_failed_run_status_1(
    tmp_path, capsys, monkeypatch
):
    def corrupt(*args, **kwargs):
        raise ValueError("ground-truth row 'row-ab.pt' does not match its SHA-256")

    monkeypatch.setattr(captum_sam.evaluation.compare, "run_compare", corrupt)
    assert main([*COMPARE, "--out", str(tmp_path / "c")]) == 1
    assert "does not match its SHA-256" in one_line_error(capsys)
    monkeypatch.setattr(captum_sam.training, "train_sam", corrupt)
    assert main([*TRAIN, "--out", str(tmp_path / "t")]) == 1
    assert "does not match its SHA-256" in one_line_error(capsys)
    assert main([*TRAIN, "--lr", "-1", "--out", str(tmp_path / "u")]) == 2  # before any work
    one_line_error(capsys)
