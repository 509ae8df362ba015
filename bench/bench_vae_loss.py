"""vae_loss forward, backward and both: reference eager, torch.compile of it, the fused C++/CUDA kernel, and the memory floor."""

OP = "vae_loss"


def test_vae_loss(case, run_case):
    run_case(case)
