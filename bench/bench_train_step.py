"""One training step of fastvae.VAE (forward, loss, backward, Adam) with the reference backend and with the fused one, eager and compiled."""

OP = "train_step"


def test_train_step(case, run_case):
    run_case(case)
