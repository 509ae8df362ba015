import os

import torch

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter. It must be
# switched on before triton is first imported, which happens lazily inside fastvae.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
