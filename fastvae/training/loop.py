"""`fastvae train`'s loop, read top to bottom: config, data, model, optimizer, resume, then the
steps, with a check every --log-every steps (losses logged, divergence, SIGTERM) and evaluation,
PNG grids and a checkpoint every --every steps and at the end. Each concern around it is a module
of this package, called by name.

One process:       fastvae train --steps 500 --out runs/shapes
Several (DDP):     torchrun --nproc_per_node 2 -m fastvae train --steps 500 --out runs/shapes
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack, closing, nullcontext
from pathlib import Path

import torch

from fastvae.model import VAE
from fastvae.training import run_folder
from fastvae.training.checkpointing import Checkpointer
from fastvae.training.checks import LossHistory, Progress
from fastvae.training.distributed import World, global_batchnorm
from fastvae.training.inputs import Inputs
from fastvae.training.options import DEFAULT_STEPS, check_run_options, resolve_device
from fastvae.training.sigterm import SigtermCatcher, stopped
from fastvae.training.step import Loss, autocast_for, beta_at, build_step


def run(args: argparse.Namespace) -> int:
    # ---- config -------------------------------------------------------------------------------
    world = World.from_env()
    device = world.place(resolve_device(args.device))
    check_run_options(args, device, world.size)
    autocast, loss = autocast_for(device, args.amp), Loss.from_args(args, world)
    out = Path(args.out)
    ckpt_path = out / run_folder.CHECKPOINT_NAME
    # Checked on every rank, so that all of them stop; held by rank 0, the only one that writes
    # there. A refused rank 0 leaves the others waiting for it below, until torchrun stops them.
    lock = run_folder.prepare_out(out, resume=args.resume, overwrite=args.overwrite, lock=world.master)
    torch.manual_seed(args.seed)
    net = train_step = batches = None
    try:
        with ExitStack() as resources:
            resources.enter_context(lock or nullcontext())
            world.start(device)
            # ---- data -------------------------------------------------------------------------
            inputs = Inputs.load(args, world, device)
            total_steps = args.steps or (args.epochs or 0) * inputs.batches.per_epoch or DEFAULT_STEPS
            # ---- model and optimizer ----------------------------------------------------------
            model = VAE(3, args.image_size, args.latent_dim, args.hidden_dims, backend=args.backend,
                        recon=args.recon).to(device)
            if world.distributed:
                model = global_batchnorm(model, device)  # before the optimizer: it may make new parameters
            optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
            scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
            # ---- resume -----------------------------------------------------------------------
            step, beta_period = run_folder.resume(ckpt_path, args, model, optimizer, scaler, inputs.record,
                                                  total_steps, say=world.master)
            batches, kept = inputs.batches_from(step, device, args)
            net = world.wrap(model, device)
            train_step = build_step(args.compile, net, optimizer, scaler, autocast, loss, device,
                                    graph_on=kept if args.cuda_graph else None,
                                    rows=min(args.log_every, args.every, total_steps))
            log = resources.enter_context(closing(run_folder.MetricsLog(out, step, overwrite=args.overwrite))) \
                if world.master else None
            if world.master:
                print(_banner(args, device, world, model, inputs, step, total_steps, kept is not None))
            if step >= total_steps:
                if world.master:
                    print(f"nothing to do: {ckpt_path} is at step {step} of {total_steps}")
                return 0
            checkpointer = Checkpointer(args, ckpt_path, model, optimizer, scaler, inputs, beta_period, world, device,
                                        autocast, loss.backend, log)
            # ---- the loop ---------------------------------------------------------------------
            sigterm = resources.enter_context(SigtermCatcher())
            progress = resources.enter_context(closing(Progress(total_steps, step, args.batch_size, show=world.master)))
            history = LossHistory()
            model.train()
            while step < total_steps:
                beta = beta_at(step, args.beta, args.beta_schedule, beta_period)
                history.add(train_step(next(batches), beta), beta)
                step += 1
                evaluating = step % args.every == 0 or step == total_steps
                # Under DDP the ranks check together, so SIGTERM waits for the next check there.
                if step % args.log_every and not evaluating and (world.distributed or not sigterm.caught):
                    continue
                # Losses reach the host only here. A checkpoint is written only after this check,
                # so it never holds a diverged model.
                progress.show(step, *history.check(step, world, log, ckpt_path))
                # torchrun sends SIGTERM to every rank, but not at one instant. On the last step, the run ends as usual.
                stopping = world.any(sigterm.caught, device) and step < total_steps
                if evaluating or stopping:  # every rank checks and stops together; rank 0 writes
                    results, grids = checkpointer.save(step, evaluate=evaluating)
                if stopping:
                    raise stopped(step, ckpt_path, say=world.master)
                progress.restart_clock(step)
            progress.close()
            if world.master:
                print(_done(step, results, args.latent_dim, [ckpt_path, *grids]))
            return 0
    finally:
        # Freed here, as this frame can outlive the run until a garbage collection (torch.fx's wrap(), imported in
        # Adam(), holds its callers' frames in a cycle): DDP's reducer, left, hung gloo's teardown (torch 2.11, one
        # run in four), and Python's exit waited for ever for the DataLoader's workers, which ignore its SIGTERM.
        net = train_step = batches = None
        world.leave(sys.exc_info()[1])


def _banner(args: argparse.Namespace, device: torch.device, world: World, model: VAE, inputs: Inputs, step: int,
            total_steps: int, on_device: bool) -> str:
    params = sum(p.numel() for p in model.parameters())
    return (
        f"training on {device} x{world.size}: {args.data or 'built-in shapes'} at "
        f"{args.image_size}x{args.image_size} ({len(inputs.train_set)} train / {len(inputs.eval_set)} held out), "
        f"latent {args.latent_dim}, hidden {','.join(map(str, args.hidden_dims))} "
        f"({params / 1e6:.2f}M params), batch {args.batch_size}, steps {step} -> {total_steps}, into {Path(args.out)}"
        f"{'; data kept on ' + str(device) if on_device else ''}"
        f"{'; compiled, ' + args.compile if args.compile != 'off' else ''}"
        f"{'; one CUDA graph a step' if args.cuda_graph else ''}"
    )


def _done(step: int, results: dict, latent_dim: int, written: list[Path]) -> str:
    return (
        f"done: step {step}; held-out loss {results['eval_loss']:.4g} (recon {results['eval_recon']:.4g}, "
        f"kl {results['eval_kl']:.4g}), {results['active_units']}/{latent_dim} active latent units; "
        f"wrote {', '.join(str(p) for p in written)}"
    )
