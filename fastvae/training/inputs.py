"""What the run reads: the training batches (kept whole on a GPU that has room, else through a
DataLoader), the held-out loader and the images of the grids."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from fastvae import data
from fastvae._workers import init_worker, start
from fastvae.training.distributed import World
from fastvae.training.errors import ConfigError
from fastvae.training.options import image_bytes

# The training set is kept whole on a GPU, and batches gathered there, when it takes at most this
# fraction of the device's free memory; the rest is left to the model, its activations and Adam.
DATA_ON_DEVICE_FRACTION = 0.25


@dataclass
class Inputs:
    train_set: Dataset
    eval_set: Dataset
    eval_loader: DataLoader
    grid_images: torch.Tensor
    batches: data.EpochBatches
    # The --data folder's fingerprint, None for the shapes (the options the resume check compares
    # fix them, but a folder can change under the same name).
    record: dict | None

    @classmethod
    def load(cls, args: argparse.Namespace, world: World, device: torch.device) -> Inputs:
        train_set, eval_set = data.train_eval_split(
            args.data, args.image_size, seed=args.seed, train_size=args.train_size, eval_size=args.eval_size
        )
        record = data.ImageFolder(args.data, args.image_size).fingerprint() if args.data else None
        batches = data.EpochBatches(
            len(train_set), args.batch_size, seed=args.seed, rank=world.rank, world_size=world.size
        )
        # Evaluation has its own generator (the loader draws a seed for its workers), so that it
        # leaves torch's global one, the training noise, alone: under DDP only rank 0 evaluates.
        eval_loader = DataLoader(
            eval_set, batch_size=args.batch_size, num_workers=args.workers, worker_init_fn=init_worker,
            generator=torch.Generator().manual_seed(args.seed),
        )
        grid_images = torch.stack([eval_set[i] for i in range(min(16, len(eval_set)))]).to(device)
        return cls(train_set, eval_set, eval_loader, grid_images, batches, record)

    def batches_from(self, step: int, device: torch.device,
                     args: argparse.Namespace) -> tuple[Iterator[torch.Tensor], torch.Tensor | None]:
        """This rank's training batches on ``device`` from ``step`` on (the data order depends on
        (seed, epoch) only, so the step fixes the position), and the training set when it is kept
        whole on ``device`` (else None). With --cuda-graph, which needs it kept there, the batches
        are their indices into it: the graph gathers them."""
        self.batches.start = step
        if data_fits_on(device, len(self.train_set), args.image_size):
            images = data.stack_on(self.train_set, device, workers=args.workers)
            indices = self.batches.on_device(device)
            return (indices if args.cuda_graph else (images.index_select(0, i) for i in indices)), images
        if args.cuda_graph:
            raise ConfigError(
                f"--cuda-graph needs the training set kept on {device}, and its {len(self.train_set)} images of "
                f"{args.image_size}x{args.image_size} would take "
                f"{image_bytes(len(self.train_set), args.image_size) / 2**30:.3g} GiB, more than "
                f"{DATA_ON_DEVICE_FRACTION:.0%} of its free memory; lower --train-size or run without --cuda-graph"
            )
        loader = DataLoader(
            self.train_set,
            batch_sampler=self.batches,
            num_workers=args.workers,
            worker_init_fn=init_worker,
            pin_memory=device.type == "cuda",
            # its own generator, so that starting the iterator leaves torch's global RNG alone
            generator=torch.Generator().manual_seed(args.seed),
        )
        return (x.to(device, non_blocking=True) for x in start(loader)), None


def data_fits_on(device: torch.device, num_images: int, image_size: int) -> bool:
    """Whether the training set stays on ``device`` whole: a GPU with DATA_ON_DEVICE_FRACTION of
    its free memory for the set's float32 RGB images. A CPU reads it through a DataLoader."""
    if device.type != "cuda":
        return False
    return image_bytes(num_images, image_size) <= DATA_ON_DEVICE_FRACTION * torch.cuda.mem_get_info(device)[0]
