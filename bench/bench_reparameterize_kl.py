"""reparameterize_kl forward, backward and both: reference eager, torch.compile of it, and the fused kernel (Triton on GPU, C++ on CPU)."""

OP = "reparameterize_kl"


def test_reparameterize_kl(case, run_case):
    run_case(case)
