"""The quantity cache is verified on every read and written atomically by one writer."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from captum_sam.core.files import LOCK, DirectoryLock
from captum_sam.core.store import (
    MANIFEST,
    data_digest,
    function_digest,
    open_quantities,
    save_quantities,
)

FP = {"estimator": "X", "data": {"n": 10}}


def rows(seed, n=10, width=3):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def save(directory, seed=0, fp=FP, sizes=(4, 4, 2)):
    data, start, parts = rows(seed), 0, []
    for i, m in enumerate(sizes):
        parts.append((i, data[start : start + m]))
        start += m
    save_quantities(directory, fp, parts)
    return data


def manifest(directory):
    with open(os.path.join(directory, MANIFEST)) as f:
        return json.load(f)


def write_manifest(directory, m):
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(m, f)


def test_round_trip_and_every_part_is_hashed(tmp_path):
    want = save(tmp_path)
    torch.testing.assert_close(open_quantities(tmp_path, FP).load(), want)
    m = manifest(tmp_path)
    assert m["version"] == 2 and all(len(p["sha256"]) == 64 for p in m["parts"])


def test_flipped_bytes_in_a_part_are_refused(tmp_path):
    save(tmp_path)
    part = os.path.join(tmp_path, manifest(tmp_path)["parts"][1]["file"])
    data = bytearray(open(part, "rb").read())
    at = len(data) // 2
    data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
    open(part, "wb").write(bytes(data))
    cache = open_quantities(tmp_path, FP)
    with pytest.raises(ValueError, match=r"parts\[1\]\.sha256") as err:
        cache.load()
    assert part in str(err.value)


def test_swapped_parts_are_refused(tmp_path):
    save(tmp_path, sizes=(5, 5))
    a, b = (os.path.join(tmp_path, p["file"]) for p in manifest(tmp_path)["parts"])
    os.rename(a, a + ".x")
    os.rename(b, a)
    os.rename(a + ".x", b)
    with pytest.raises(ValueError, match="SHA-256"):
        open_quantities(tmp_path, FP).load()


def test_a_part_dropped_from_the_manifest_is_refused(tmp_path):
    save(tmp_path)
    m = manifest(tmp_path)
    m["parts"].pop()
    write_manifest(tmp_path, m)
    with pytest.raises(ValueError, match="field parts has 8 rows but field shape says 10"):
        open_quantities(tmp_path, FP)
    m["shape"][0] = 8  # consistent with itself, but not with the 10 training examples
    write_manifest(tmp_path, m)
    with pytest.raises(ValueError, match="8 rows for a training set of 10"):
        open_quantities(tmp_path, FP)


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    save(tmp_path)
    before = manifest(tmp_path)
    with DirectoryLock(str(tmp_path), "test"):  # a live writer (this process)
        with pytest.raises(ValueError, match="being written by another process"):
            save(tmp_path, seed=1)
    assert manifest(tmp_path) == before  # untouched
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(os.path.join(tmp_path, LOCK), "w") as f:
        json.dump({"host": os.uname().nodename, "pid": dead.pid}, f)
    want = save(tmp_path, seed=2)  # the killed writer's lock is replaced
    torch.testing.assert_close(open_quantities(tmp_path, FP).load(), want)
    assert not os.path.exists(os.path.join(tmp_path, LOCK))


needs_flock = pytest.mark.skipif(os.name != "posix", reason="kernel-released locks need flock")


@needs_flock
def test_a_lock_file_naming_a_live_but_unrelated_process_is_taken_over(tmp_path):
    # A killed writer's pid can be reused by another process: the file then names a live
    # pid, but nobody holds the lock, so a new writer must not be refused.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with open(os.path.join(tmp_path, LOCK), "w") as f:
            json.dump({"host": os.uname().nodename, "pid": sleeper.pid}, f)
        want = save(tmp_path, seed=5)
        torch.testing.assert_close(open_quantities(tmp_path, FP).load(), want)
    finally:
        sleeper.kill()
        sleeper.wait()


CONTENDER = textwrap.dedent(
    """
    import os, sys, time
    from captum_sam.core.files import DirectoryLock
    directory, mark, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    done = 0
    while done < rounds:
        try:
            with DirectoryLock(directory, "contender"):
                fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if shared
                time.sleep(0.002)
                os.close(fd)
                os.remove(mark)
            done += 1
        except ValueError:
            time.sleep(0.001)
    """
)


@needs_flock
def test_contending_writers_never_hold_the_lock_together(tmp_path):
    directory, mark = str(tmp_path / "d"), str(tmp_path / "inside")
    os.makedirs(directory)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(os.path.join(directory, LOCK), "w") as f:  # a dead writer's lock to take over
        json.dump({"host": os.uname().nodename, "pid": dead.pid}, f)
    procs = [
        subprocess.Popen([sys.executable, "-c", CONTENDER, directory, mark, "25"]) for _ in range(4)
    ]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0, 0, 0]  # a FileExistsError on the mark means two held the lock
    assert not os.path.exists(os.path.join(directory, LOCK))


def test_an_interrupted_save_leaves_the_old_cache_intact(tmp_path):
    want = save(tmp_path)

    def failing():
        yield 0, rows(5)[:4]
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        save_quantities(tmp_path, FP, failing())
    torch.testing.assert_close(open_quantities(tmp_path, FP).load(), want)
    save(tmp_path, seed=3)  # the next save cleans the orphan part up
    files = [f for f in os.listdir(tmp_path) if f.startswith("part-")]
    assert sorted(files) == sorted(p["file"] for p in manifest(tmp_path)["parts"])


SLOW_SAVE = textwrap.dedent(
    """
    import sys, time, torch
    from captum_sam.core.store import save_quantities
    def parts():
        for i in range(50):
            yield i, torch.ones(2, 3, dtype=torch.float64)
            print("part", i, flush=True)
            time.sleep(0.2)
    save_quantities(sys.argv[1], {"estimator": "X", "data": {"n": 100}}, parts())
    """
)


def test_a_killed_save_process_leaves_the_old_cache_usable(tmp_path):
    want = save(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    for line in proc.stdout:  # wait until it has written parts, then kill it
        if line.startswith("part 2"):
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.exists(os.path.join(tmp_path, LOCK))  # it died holding the lock
    torch.testing.assert_close(open_quantities(tmp_path, FP).load(), want)
    time.sleep(0.05)
    save(tmp_path, seed=4)  # the dead writer's lock and parts do not stop a new save


def test_manifest_fields_are_validated(tmp_path):
    save(tmp_path)
    good = manifest(tmp_path)
    cases = {
        "version": 1,
        "shape": [10, "3"],
        "dtype": "torch.int64",
        "parts": [],
    }
    for field, value in cases.items():
        write_manifest(tmp_path, {**good, field: value})
        with pytest.raises(ValueError, match=f"field {field}"):
            open_quantities(tmp_path, FP)
    bad_part = dict(good["parts"][0], sha256="zz")
    write_manifest(tmp_path, {**good, "parts": [bad_part, *good["parts"][1:]]})
    with pytest.raises(ValueError, match=r"field parts\[0\]"):
        open_quantities(tmp_path, FP)
    outside = dict(good["parts"][0], file="../part-0123456789ab-000000.pt")
    write_manifest(tmp_path, {**good, "parts": [outside, *good["parts"][1:]]})
    with pytest.raises(ValueError, match=r"field parts\[0\]"):
        open_quantities(tmp_path, FP)
    with open(os.path.join(tmp_path, MANIFEST), "wb") as f:
        f.write(b"\xff\xfe not utf-8")
    with pytest.raises(ValueError, match="not UTF-8"):
        open_quantities(tmp_path, FP)


def _fuzz_values(rng):
    return rng.choice(
        [None, True, -1, 0, 10**12, 1.5, float("nan"), "x", "torch.float64", [], [1], {}, {"a": 1}]
    )


def test_fuzzed_manifests_load_or_raise_value_error(tmp_path):
    save(tmp_path)
    good = manifest(tmp_path)
    rng = random.Random(0)
    paths = [("format",), ("version",), ("fingerprint",), ("shape",), ("dtype",), ("parts",)]
    paths += [("parts", 0, key) for key in ("file", "rows", "sha256")]
    for _ in range(200):
        m = json.loads(json.dumps(good))
        path = rng.choice(paths)
        target = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = _fuzz_values(rng)
        write_manifest(tmp_path, m)
        try:
            open_quantities(tmp_path, FP).load()
        except ValueError as err:
            assert str(path[0]) in str(err) or "stale cache" in str(err), (path, err)


class Items(Dataset):
    def __init__(self, values):
        self.values = values

    def __len__(self):
        return len(self.values)

    def __getitem__(self, i):
        return torch.tensor([self.values[i]], dtype=torch.float64), torch.tensor(0)


def test_data_is_fingerprinted_by_content():
    a, b = Items([1.0, 2.0, 3.0]), Items([1.0, 2.0, 4.0])
    assert data_digest(a)["n"] == data_digest(b)["n"]
    assert data_digest(a) != data_digest(b)  # same type and length, other examples
    assert data_digest(a) == data_digest(Items([1.0, 2.0, 3.0]))
    t = TensorDataset(torch.arange(3.0))
    assert data_digest(t) != data_digest(TensorDataset(torch.arange(3.0) + 1))


def summed_squares(outputs, labels):
    return (outputs - labels).square().sum(1)


def test_function_fingerprint_is_the_same_in_another_process():
    here = function_digest(summed_squares)
    code = (
        "import json, sys; sys.path.insert(0, '.');"
        "from captum_sam.core.store import function_digest;"
        "from tests.test_integrity_store import summed_squares;"
        "print(json.dumps(function_digest(summed_squares)))"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(there) == here
    assert "0x" not in "".join(function_digest(torch.nn.CrossEntropyLoss(reduction="none")))
    assert function_digest(torch.nn.CrossEntropyLoss(reduction="none")) != function_digest(
        torch.nn.CrossEntropyLoss(reduction="sum")
    )


def test_fingerprinting_data_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    data_digest(Items([1.0, 2.0, 3.0]))
    assert torch.equal(torch.rand(3), expected)
