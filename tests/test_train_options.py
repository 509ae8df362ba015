"""Integer options as a user mistypes them: each is bounded, and a value out of bounds is refused
in argparse's one line, exit status 2, before anything runs."""

import os
import subprocess
import sys

import pytest

from fastvae.cli import build_parser
from test_train import REPO, TINY

HUGE = "99999999999999999999999"  # past what a C++ int64 holds


def fastvae(*argv, **kwargs):
    """``python -m fastvae argv`` in a subprocess, as a user runs it."""
    command = [sys.executable, "-m", "fastvae", *map(str, argv)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, **kwargs)


def usable_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.mark.parametrize(
    "option, expected",
    [
        ("--latent-dim", "int >= 1 and < 2**16"),
        ("--train-size", "int >= 1 and < 2**63"),
        ("--eval-size", "int >= 1 and < 2**63"),
        ("--steps", "int >= 1 and < 2**63"),
        ("--epochs", "int >= 1 and < 2**63"),
        ("--batch-size", "int >= 1 and < 2**63"),
        ("--beta-period", "int >= 1 and < 2**63"),
        ("--every", "int >= 1 and < 2**63"),
        ("--log-every", "int >= 1 and < 2**16"),
        ("--seed", "int >= 0 and < 2**64"),
        ("--workers", f"int >= 0 and <= {usable_cpus()} (the CPUs this process may use)"),
    ],
)
def test_a_huge_integer_option_is_refused_in_one_line(tmp_path, option, expected):
    result = fastvae("train", *TINY, "--out", tmp_path / "run", option, HUGE)
    assert result.returncode == 2
    assert result.stderr == f"fastvae train: error: argument {option}: expected {expected}, got '{HUGE}' (see --help)\n"
    assert not (tmp_path / "run").exists()


def test_log_every_is_bounded_by_what_the_losses_between_two_checks_may_hold(tmp_path, capsys):
    # Those losses wait on the device until the check: a typo of a period must not ask for terabytes.
    result = fastvae("train", *TINY, "--out", tmp_path / "run", "--log-every", 4000000000000)
    assert result.returncode == 2
    assert result.stderr == ("fastvae train: error: argument --log-every: expected int >= 1 and < 2**16, "
                             "got '4000000000000' (see --help)\n")
    assert not (tmp_path / "run").exists()
    parse = build_parser("train").parse_args
    assert parse(["train", "--log-every", str(2**16 - 1)]).log_every == 2**16 - 1
    with pytest.raises(SystemExit) as refused:
        parse(["train", "--log-every", str(2**16)])
    assert refused.value.code == 2
    assert capsys.readouterr().err.endswith("argument --log-every: expected int >= 1 and < 2**16, got '65536' (see --help)\n")


@pytest.mark.parametrize("dims", [f"8,{HUGE}", f"{2**16},8", "8,0"])
def test_a_channel_count_out_of_bounds_is_refused_in_one_line(tmp_path, dims):
    result = fastvae("train", *TINY, "--out", tmp_path / "run", "--hidden-dims", dims)
    assert result.returncode == 2
    assert result.stderr == (
        f"fastvae train: error: argument --hidden-dims: expected channel counts >= 1 and < 2**16, got '{dims}' "
        "(see --help)\n"
    )


@pytest.mark.parametrize("command", ["sample", "reconstruct"])
def test_a_huge_image_count_is_refused_in_one_line(tmp_path, command):
    result = fastvae(command, "--checkpoint", tmp_path / "ckpt.pt", "--out", tmp_path / "x.png", "--n", HUGE)
    assert result.returncode == 2
    assert result.stderr == f"fastvae {command}: error: argument --n: expected int >= 1 and < 2**63, got '{HUGE}' (see --help)\n"


def test_the_widest_model_the_options_allow_is_refused_for_its_memory_not_by_torch(tmp_path):
    # The bounds keep every tensor's size within what torch can count: the widest model is
    # refused by the memory check, in one line, rather than by torch's overflow.
    result = fastvae("train", "--device", "cpu", "--out", tmp_path / "run", "--image-size", 4096,
                     "--hidden-dims", 2**16 - 1, "--latent-dim", 2**16 - 1)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "fastvae train: error: --latent-dim 65535 and --hidden-dims 65535 at --image-size 4096: a model of "
    ), result.stderr
    assert result.stderr.count("\n") == 1


def test_workers_up_to_the_cpu_count_are_taken():
    args = build_parser("train").parse_args(["train", "--workers", str(usable_cpus())])
    assert args.workers == usable_cpus()
