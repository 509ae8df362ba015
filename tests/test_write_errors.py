"""Every file the CLI fails to write is named in its one line: the user's path, not the temporary
beside it, nor no path at all (a full disk, a file-size limit, a folder that refuses files)."""

import pytest

from fastvae import _files
from test_train import TINY, fastvae_with_file_size_limit, train

# Far below any grid (a few KB), above the tiny run's metrics.jsonl before its first grid (about 350 bytes).
LIMIT = 1000


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train(out, "--steps", 1, "--every", 1) == 0
    return out / "ckpt.pt"


def assert_one_line(result, command, line):
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == f"fastvae {command}: error: {line}\n"


def test_a_grid_that_does_not_fit_is_named(tmp_path):
    out = tmp_path / "run"
    result = fastvae_with_file_size_limit(LIMIT, "train", *TINY, "--out", out, "--steps", 2, "--every", 2)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == f"fastvae train: error: {out / 'reconstructions_000002.png'}: File too large"
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [".fastvae.lock", "metrics.jsonl"]  # no temporary left


@pytest.mark.parametrize("command", ["sample", "reconstruct"])
def test_an_image_that_does_not_fit_is_named(tmp_path, trained, command):
    out = tmp_path / "grid.png"
    result = fastvae_with_file_size_limit(LIMIT, command, "--checkpoint", trained, "--out", out, "--device", "cpu")
    assert_one_line(result, command, f"{out}: File too large")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_refuses_the_image_is_named_by_the_users_path(trained):
    # /proc/self exists but takes no new files: the temporary beside --out cannot be made.
    result = fastvae_with_file_size_limit(10**9, "sample", "--checkpoint", trained, "--out", "/proc/self/s.png")
    assert_one_line(result, "sample", "/proc/self/s.png: No such file or directory")


def test_an_error_about_another_file_keeps_its_name(tmp_path):
    # Only the write's own errors are the target's: one about a file ``write`` reads stays its own.
    def copy_missing(f):
        f.write((tmp_path / "missing.bin").read_bytes())

    with pytest.raises(FileNotFoundError) as caught:
        _files.write_atomically(tmp_path / "out.bin", copy_missing)
    assert caught.value.filename == str(tmp_path / "missing.bin")
    assert list(tmp_path.iterdir()) == []


def test_a_lock_that_does_not_fit_is_named(tmp_path):
    # The run's folder takes an empty file (its check), but not the lock's few words.
    out = tmp_path / "run"
    result = fastvae_with_file_size_limit(5, "train", *TINY, "--out", out, "--steps", 1)
    assert_one_line(result, "train", f"{out / '.fastvae.lock'}: File too large")


def test_metrics_that_do_not_fit_are_named(tmp_path):
    # The lock's few words fit, the first record of metrics.jsonl (written line by line) does not.
    out = tmp_path / "run"
    result = fastvae_with_file_size_limit(150, "train", *TINY, "--out", out, "--steps", 4, "--every", 2)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == f"fastvae train: error: {out / 'metrics.jsonl'}: File too large"
    assert "Traceback" not in result.stderr
