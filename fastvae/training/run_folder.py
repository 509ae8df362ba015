"""The run folder, --out: its lock, --overwrite, metrics.jsonl and the checkpoint, and the checks
that a checkpoint resumed is of the same run and the same data."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from fastvae import checkpoint
from fastvae._files import TEMPORARY_SUFFIX, HeldError, hold, naming, remove_stale_temporaries
from fastvae.training.errors import ConfigError

try:  # optional: TensorBoard events beside metrics.jsonl when tensorboard is installed
    from torch.utils.tensorboard import SummaryWriter
except ImportError:
    SummaryWriter = None

CHECKPOINT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"
# Held by the run (rank 0 under torchrun) for its whole life; left in place after it, unlocked.
LOCK_NAME = ".fastvae.lock"
# Every file a run writes into --out, by name (and the temporaries a kill mid-write leaves):
# what --overwrite deletes, so that nothing else in the folder is ever touched.
RUN_FILES = re.compile(
    rf"({re.escape(CHECKPOINT_NAME)}|{re.escape(METRICS_NAME)}|"
    r"(reconstructions|samples|interpolations)_\d{6,}\.png|events\.out\.tfevents\..+)"
    rf"({TEMPORARY_SUFFIX.pattern})?"
)
# What a resumed run must share with the checkpoint's: the data, its order and the objective.
# The length (--steps, --epochs), the logging, the device, the backend, --amp and --compile may change.
SAME_RUN_OPTIONS = (
    "data", "train_size", "eval_size", "batch_size", "seed", "lr", "beta", "beta_schedule", "beta_period",
    "free_bits", "reduction", "recon_reduction", "kl_reduction",
)


def prepare_out(out: Path, *, resume: bool, overwrite: bool, lock: bool):
    """Make the --out folder and, with ``lock``, hold it for the run (until the returned file is
    closed, or the process dies), or raise ConfigError saying why the run cannot write there:
    before anything is trained, and before a run already there is touched without --resume or
    --overwrite, or while another process holds it.

    The run that holds the folder then deletes the temporaries that runs killed mid-write left
    there: else each kill -9 of a long job could leave a checkpoint-sized file behind."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write there ({exc.strerror})") from None
    held = None
    if lock:
        try:
            held = hold(out / LOCK_NAME)
        except HeldError as exc:
            raise ConfigError(
                f"--out {out} is in use by another run ({exc}, which holds {out / LOCK_NAME}); "
                "wait for it to end or stop it"
            ) from None
        if held is None:
            print(f"warning: cannot lock --out {out} on this platform (no fcntl); "
                  "start no other run on it until this one ends", file=sys.stderr)
    try:
        for name in (CHECKPOINT_NAME, METRICS_NAME):
            if (out / name).exists() and not (out / name).is_file():
                raise ConfigError(f"{out / name} is not a file; move it out of the way")
        previous = [name for name in (CHECKPOINT_NAME, METRICS_NAME) if (out / name).exists()]
        if previous and not (resume or overwrite):
            raise ConfigError(
                f"--out {out} already holds a run ({', '.join(previous)}): "
                "pass --resume to continue it or --overwrite to replace it"
            )
        if lock:
            remove_stale_temporaries(out, RUN_FILES)
    except BaseException:
        if held is not None:
            held.close()
        raise
    return held


def remove_run(out: Path) -> None:
    """Delete the files that a run wrote into ``out`` (RUN_FILES), and nothing else."""
    for path in out.iterdir():
        if RUN_FILES.fullmatch(path.name) and path.is_file():
            path.unlink()


def check_same_run(saved: dict, args: argparse.Namespace, path: Path) -> None:
    """Refuse to resume with other data or another objective: the checkpoint's optimizer state,
    data order and noise follow them. --beta-period, left out, takes the saved one."""
    differences = []
    for key in SAME_RUN_OPTIONS:
        there, here = saved.get(key), getattr(args, key)
        if key not in saved or (key == "beta_period" and here is None):
            continue
        if key == "data" and there is not None and here is not None:
            there, here = (str(Path(p).resolve()) for p in (there, here))
        if there != here:
            differences.append(f"--{key.replace('_', '-')} {there} there but {here} here")
    if differences:
        raise ConfigError(f"{path} is from another run: {'; '.join(differences)} (resume with the same options)")


def check_same_data(ckpt: dict, current: dict, folder: str, path: Path, *, say: bool) -> None:
    """Refuse to resume on a --data folder whose fingerprint is not the one the checkpoint trained
    on. A checkpoint older than the record is let through, saying so when ``say``."""
    if "data" not in ckpt:
        if say:
            print(f"{path} does not record the images it trained on (an older fastvae wrote it): "
                  f"--data {folder} is not checked against it")
        return
    if ckpt["data"] == current:
        return
    then = ckpt["data"].get("images") if isinstance(ckpt["data"], dict) else None
    if then is not None and then != current["images"]:
        change = f"it held {then} images then and {current['images']} now"
    else:
        change = f"images were added, removed, rewritten or touched ({current['images']} now)"
    raise ConfigError(
        f"{path} trained on other images: since then, in --data {folder}, {change}; "
        "pass --allow-changed-data to resume on them anyway"
    )


def resume(ckpt_path: Path, args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer,
           scaler: torch.amp.GradScaler, data_record: dict | None, total_steps: int, *, say: bool) -> tuple[int, int]:
    """With --resume, load the run's checkpoint, if there is one, into ``model``, ``optimizer`` and
    ``scaler`` after checking it is of this run and data; the step it is at and the run's
    --beta-period. What there is to say (no checkpoint; one older than the digest or the data
    record) is said when ``say``: by rank 0 alone under DDP, though every rank loads and checks it."""
    step, saved_args = 0, {}
    if args.resume and ckpt_path.exists():
        with warnings.catch_warnings():
            if not say:
                warnings.simplefilter("ignore", checkpoint.CheckpointWarning)
            ckpt = checkpoint.load(ckpt_path, resumable=True)
        checkpoint.check_config(ckpt["config"], model.config, ckpt_path)
        saved_args = ckpt.get("args", {})
        check_same_run(saved_args, args, ckpt_path)
        if args.data is not None and not args.allow_changed_data:
            check_same_data(ckpt, data_record, args.data, ckpt_path, say=say)
        checkpoint.restore(ckpt, ckpt_path, model, optimizer, scaler)
        step = ckpt["step"]
    elif args.resume and say:
        print(f"no checkpoint in {ckpt_path.parent}; starting from scratch")
    # The default period follows the run's length, which a resume may extend: it keeps the first one's.
    return step, args.beta_period or saved_args.get("beta_period") or max(1, total_steps // 4)


def save(ckpt_path: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler, data_record: dict | None, args: argparse.Namespace, beta_period: int) -> None:
    """The checkpoint: everything a resumed run needs to go on as if never stopped."""
    checkpoint.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "config": model.config,
            "rng": checkpoint.rng_state(),
            "data": data_record,
            "args": {
                **{k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()},
                "beta_period": beta_period,
            },
        },
        ckpt_path,
    )


def kept(ckpt_path: Path) -> str:
    """What a run that stops keeps, for its last line."""
    return f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint yet"


class MetricsLog:
    """metrics.jsonl, every record of the run, and TensorBoard's events beside it where tensorboard
    is installed. With ``overwrite``, the old run's files go first, before training, so that a later
    --resume cannot continue the old run."""

    def __init__(self, out: Path, step: int, *, overwrite: bool) -> None:
        if overwrite:
            remove_run(out)
        self._path = out / METRICS_NAME
        self._file = _open_metrics(self._path, step)
        self._writer = SummaryWriter(str(out)) if SummaryWriter is not None else None

    def log(self, record: dict) -> None:
        # NaN and Infinity are not JSON, and strict readers refuse them: each is null, named with its value.
        non_finite = {key: str(v) for key, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
        line = {**record, **dict.fromkeys(non_finite), "non_finite": non_finite} if non_finite else record
        try:
            self._file.write(json.dumps(line, allow_nan=False) + "\n")
        except OSError as exc:  # a full disk: the open file's error names no file
            raise naming(exc, self._path) from exc
        if self._writer is not None:
            for key, value in record.items():
                if key != "step":
                    self._writer.add_scalar(key, value, record["step"])

    def flush(self) -> None:
        """TensorBoard's events as far as the checkpoint, as metrics.jsonl's (written line by line)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as exc:
            raise naming(exc, self._path) from exc
        if self._writer is not None:
            self._writer.close()


def _open_metrics(path: Path, step: int):
    """metrics.jsonl for appending, without the lines that an interrupted run logged after its last
    checkpoint at ``step`` (a fresh run, step 0, starts it empty).

    One pass, line by line, finds where the records the checkpoint covers end, and the file is cut
    there in place: memory stays constant however long the history, and one truncate leaves, if
    killed, the whole history or the kept part. Lines that are not records of ours (JSON added by
    hand) after the last kept record are cut with the rest. A line that is not JSON is tolerated
    past the last kept record only, where a kill mid-write leaves a torn one; before it, it is
    damage that a resumed run would build on, and ConfigError names its line. NaN and Infinity,
    which Python's json reads, are not JSON: the file stays one that any JSON reader takes.
    """
    with open(path, "a+b") as f:
        f.seek(0)
        end, broken = 0, None  # the byte offset after the last kept record; the first line not JSON
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line, parse_constant=_not_json) if line.strip() else None
            except ValueError:  # not JSON, or not UTF-8
                broken = broken or number
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                continue
            if record["step"] > step:
                break
            if broken is not None:
                raise ConfigError(
                    f"{path} line {broken} is not a JSON record, but records up to the checkpoint's step {step} "
                    "follow it; mend or delete that line, then resume again"
                )
            end = f.tell()
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
    return open(path, "a", buffering=1)


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")
