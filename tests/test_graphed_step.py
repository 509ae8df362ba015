"""The training step captured into one CUDA graph (fastvae.training.graphed_step), and Adam's
state set for it (fastvae.training.adam_state).

On a CPU the static-buffer step runs uncaptured and must give the ordinary step's losses and
weights bit for bit; on CUDA the captured step must follow eager to float rounding and draw new
noise at every replay."""

import pytest
import torch

from conftest import CUDA_DEVICES
from fastvae import ops
from fastvae.model import VAE
from fastvae.training.adam_state import needs_capturable, set_capturable
from fastvae.training.graphed_step import CaptureError, GraphedStep

BATCH = 8
IMAGES = 40  # 5 batches: the runs below go round the set more than once


def make_run(device, *, amp=None, capturable=False, compile_=False, seed=0):
    """A tiny VAE, its Adam and its training step ``step(x, beta) -> (objective, recon, kl)``, as
    `fastvae train` builds them: autocast inside, beta weighing the KL, zero_grad, backward, Adam."""
    torch.manual_seed(seed)
    model = VAE(3, 16, 4, (8, 16)).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, capturable=capturable)

    def step(x, beta):
        with torch.autocast(torch.device(device).type, dtype=amp, enabled=amp is not None):
            x_hat, mu, logvar = model(x)
            _, recon, kl = ops.vae_loss(x_hat, x, mu, logvar, reduction="batchmean", recon=model.recon)
            objective = recon + beta * kl
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        return torch.stack([objective, recon, kl]).detach().float()

    if compile_:
        step = torch.compile(step, dynamic=False, options={"fallback_random": True})
    return model, optimizer, step


def data(device):
    images = torch.rand(IMAGES, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(device)
    orders = [torch.randperm(IMAGES, generator=torch.Generator().manual_seed(2 + epoch)) for epoch in range(4)]
    batches = [indices.to(device) for order in orders for indices in order.split(BATCH)]
    betas = [0.25 * (k % 5) for k in range(len(batches))]  # a schedule that changes every step
    return images, batches, betas


def run_eager(device, steps, **options):
    model, optimizer, step = make_run(device, **options)
    images, batches, betas = data(device)
    beta = torch.empty((), device=device)
    torch.manual_seed(3)  # the noise
    losses = [step(images.index_select(0, batches[k]), beta.fill_(betas[k])) for k in range(steps)]
    return torch.stack(losses), model, optimizer


def run_graphed(device, steps, *, history_size, capture=None, **options):
    """The same run through GraphedStep, reading its ring of losses every ``history_size`` steps
    (and at the end), as the training loop reads at its checks."""
    model, optimizer, step = make_run(device, **options)
    images, batches, betas = data(device)
    graphed = GraphedStep(step, images, BATCH, history_size=history_size, capture=capture)
    torch.manual_seed(3)
    losses, rows = [], []
    for k in range(steps):
        rows.append(graphed(batches[k], betas[k]))
        if len(rows) == history_size or k == steps - 1:
            losses += [row.clone() for row in rows]
            rows.clear()
    return torch.stack(losses), model, optimizer, graphed


def assert_same_state(model_a, optimizer_a, model_b, optimizer_b, check):
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        check(b, a, name)
    for param_a, param_b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        for key, a in optimizer_a.state[param_a].items():
            check(optimizer_b.state[param_b][key].to(a.device), a, key)


def bitwise(actual, expected, name):
    assert torch.equal(actual, expected), name


@pytest.mark.parametrize(
    "amp, compile_, history_size",
    [(None, False, 1), (None, False, 4), (torch.bfloat16, False, 4), (None, True, 4)],
    ids=["fp32-ring-1", "fp32", "bf16", "compiled-inside"],
)
def test_uncaptured_static_step_is_the_ordinary_step_bit_for_bit(amp, compile_, history_size):
    steps = 9  # past the ring's end, and round the training set
    expected, model_e, optimizer_e = run_eager("cpu", steps, amp=amp, compile_=compile_)
    losses, model_g, optimizer_g, graphed = run_graphed("cpu", steps, history_size=history_size, amp=amp,
                                                        compile_=compile_)
    assert torch.equal(losses, expected)
    # The weights, BatchNorm's running statistics and batch count, and Adam's moments and step.
    assert_same_state(model_e, optimizer_e, model_g, optimizer_g, bitwise)
    assert model_g.encoder[3].num_batches_tracked.item() == steps
    assert optimizer_g.state[next(model_g.parameters())]["step"].item() == steps
    assert graphed.counter.item() == graphed.taken == steps
    assert graphed.graph is None


def test_a_row_holds_its_step_for_history_size_steps():
    model, optimizer, step = make_run("cpu")
    images, batches, betas = data("cpu")
    graphed = GraphedStep(step, images, BATCH, history_size=3)
    rows = [graphed(batches[k], 1.0) for k in range(3)]
    kept = [row.clone() for row in rows]
    fourth = graphed(batches[3], 1.0)
    assert fourth.data_ptr() == rows[0].data_ptr()  # the ring came round: step 4 wrote over step 1
    assert torch.equal(rows[0], fourth) and not torch.equal(fourth, kept[0])
    assert torch.equal(torch.stack(rows[1:]), torch.stack(kept[1:]))


@pytest.mark.parametrize(
    "indices, beta, error, message",
    [
        (torch.zeros(BATCH, dtype=torch.int32), 1.0, TypeError,
         r"indices must be int64 of shape \(8\), got torch.int32 \(8\)"),
        (torch.zeros(BATCH + 1, dtype=torch.int64), 1.0, TypeError, r"int64 of shape \(8\), got torch.int64 \(9\)"),
        ([0] * BATCH, 1.0, TypeError, r"int64 of shape \(8\), got list"),
        (torch.zeros(BATCH, dtype=torch.int64, device="meta"), 1.0, ValueError,
         "indices must be on cpu, where the images are, got meta"),
        (torch.zeros(BATCH, dtype=torch.int64), torch.zeros(()), TypeError, "beta must be a float, got Tensor"),
        (torch.zeros(BATCH, dtype=torch.int64), True, TypeError, "beta must be a float, got bool"),
    ],
)
def test_bad_inputs_are_refused_before_the_step_runs(indices, beta, error, message):
    calls = []
    graphed = GraphedStep(lambda x, b: calls.append(1), torch.rand(IMAGES, 3, 4, 4), BATCH, history_size=2)
    with pytest.raises(error, match=message):
        graphed(indices, beta)
    assert not calls and graphed.taken == 0


@pytest.mark.parametrize(
    "images, options, error, message",
    [
        (torch.zeros(IMAGES, 3, dtype=torch.int64), {}, TypeError,
         r"floating-point tensor of \(N, ...\) images, got \(40, 3\)"),
        ([1.0], {}, TypeError, "floating-point tensor of .* got list"),
        (torch.rand(4, 3), {}, ValueError, "batch_size is 8 but images holds 4"),
        (torch.rand(IMAGES, 3), {"history_size": 0}, ValueError, "history_size must be at least 1, got 0"),
        (torch.rand(IMAGES, 3), {"warmup": 0}, ValueError, "warmup must be at least 1, got 0"),
        (torch.rand(IMAGES, 3), {"history_size": 2.0}, TypeError, "history_size must be an int, got float"),
        (torch.rand(IMAGES, 3), {"capture": True}, ValueError, "capture needs CUDA images, got images on cpu"),
    ],
)
def test_bad_options_are_refused(images, options, error, message):
    with pytest.raises(error, match=message):
        GraphedStep(lambda x, b: x, images, BATCH, **{"history_size": 2, **options})


def saved_adam(device):
    """An Adam whose state a checkpoint of a non-capturable run filled, for a model on ``device``."""
    model, optimizer, step = make_run("cpu")
    images, batches, _ = data("cpu")
    step(images.index_select(0, batches[0]), torch.tensor(1.0))
    saved = optimizer.state_dict()
    with torch.device(device):
        resumed = VAE(3, 16, 4, (8, 16))
    optimizer = torch.optim.Adam(resumed.parameters(), lr=3e-3)
    optimizer.load_state_dict(saved)
    return resumed, optimizer


def test_set_capturable_moves_each_step_count_where_its_parameter_lives():
    # Parameters on the meta device stand in for a GPU's: where they live is not the CPU.
    model, optimizer = saved_adam("meta")
    assert not optimizer.param_groups[0]["capturable"]
    assert {optimizer.state[p]["step"].device.type for p in model.parameters()} == {"cpu"}  # as torch loads it
    set_capturable(optimizer, True)
    assert all(group["capturable"] for group in optimizer.param_groups)
    for param in model.parameters():
        step = optimizer.state[param]["step"]
        assert step.device == param.device and step.dtype == torch.float32 and step.dim() == 0
        assert optimizer.state[param]["exp_avg"].device == param.device


def test_set_capturable_keeps_the_counts_both_ways():
    model, optimizer = saved_adam("cpu")
    set_capturable(optimizer, True)
    set_capturable(optimizer, False)
    assert not any(group["capturable"] for group in optimizer.param_groups)
    for param in model.parameters():
        step = optimizer.state[param]["step"]
        assert step.device.type == "cpu" and step.dtype == torch.float32 and step.item() == 1


def test_set_capturable_on_a_cpu_run_resumed_from_a_gpu_checkpoint_steps_on():
    # A graphed run's checkpoint says capturable=True, which torch's CPU Adam refuses to step.
    model, optimizer = saved_adam("cpu")
    optimizer.param_groups[0]["capturable"] = True
    saved = optimizer.state_dict()
    resumed_model, resumed, step = make_run("cpu")
    resumed.load_state_dict(saved)
    images, batches, _ = data("cpu")
    with pytest.raises(AssertionError, match="If capturable=True, params and state_steps must be on supported devices"):
        step(images.index_select(0, batches[1]), torch.tensor(1.0))
    set_capturable(resumed, needs_capturable(torch.device("cpu"), compiled=True, graphed=True))
    step(images.index_select(0, batches[1]), torch.tensor(1.0))
    assert resumed.state[next(resumed_model.parameters())]["step"].item() == 2


def test_set_capturable_refuses_an_optimizer_without_the_option():
    optimizer = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(TypeError, match="SGD has no capturable option; expected Adam"):
        set_capturable(optimizer, True)


def test_needs_capturable_only_for_a_compiled_or_graphed_step_on_a_gpu():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert needs_capturable(cuda, compiled=True, graphed=False)
    assert needs_capturable(cuda, compiled=False, graphed=True)
    assert not needs_capturable(cuda, compiled=False, graphed=False)
    assert not needs_capturable(cpu, compiled=True, graphed=True)


# ---- CUDA: the captured step -------------------------------------------------------------------


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("compile_", [False, True], ids=["eager-inside", "compiled-inside"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_captured_step_follows_eager_over_20_steps(device, amp, compile_):
    steps = 20
    expected, model_e, optimizer_e = run_eager(device, steps, amp=amp, capturable=True)
    losses, model_g, optimizer_g, graphed = run_graphed(
        device, steps, history_size=4, amp=amp, capturable=True, compile_=compile_
    )
    assert graphed.graph is not None  # captured after the warm-up, then replayed
    # The same noise, batches and betas: only rounding differs (cuBLAS may pick other kernels on the
    # capture stream; inductor fuses differently), and bf16 rounds at 2**-8.
    tolerance = {"rtol": 2e-2, "atol": 1e-3} if amp is not None else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(losses, expected, **tolerance)

    def close(actual, expected, name):
        if expected.is_floating_point():
            torch.testing.assert_close(actual, expected, **tolerance, msg=name)
        else:
            assert torch.equal(actual, expected), name

    assert_same_state(model_e, optimizer_e, model_g, optimizer_g, close)
    assert model_g.encoder[3].num_batches_tracked.item() == steps
    assert optimizer_g.state[next(model_g.parameters())]["step"].item() == steps


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_each_replay_draws_new_noise_the_eager_draws(device):
    zeros = torch.zeros(BATCH, 4, device=device)

    def noise(x, beta):  # z of N(0, 1): the noise itself
        return ops.reparameterize(zeros, zeros)[0]

    images = torch.rand(IMAGES, 3, device=device)
    indices = torch.arange(BATCH, device=device)
    torch.manual_seed(5)
    eager = [noise(None, None) for _ in range(6)]
    graphed = GraphedStep(noise, images, BATCH, history_size=6, warmup=2)
    torch.manual_seed(5)
    rows = torch.stack([graphed(indices, 0.0) for _ in range(6)])
    assert graphed.graph is not None
    assert not torch.equal(rows[3], rows[4]) and not torch.equal(rows[4], rows[5])  # replays
    assert torch.equal(rows, torch.stack(eager))


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_a_step_that_reads_on_the_host_cannot_be_captured_and_says_so(device):
    # Last in this file: a failed capture is the one case here that may leave the device's state odd.
    def syncing(x, beta):
        return x.sum().view(1) * float(x.sum().item() > 0)

    graphed = GraphedStep(syncing, torch.rand(IMAGES, 3, device=device), BATCH, history_size=2, warmup=1)
    indices = torch.arange(BATCH, device=device)
    graphed(indices, 1.0)  # the warm-up runs uncaptured, host read and all
    message = r"^the training step could not be captured into a CUDA graph \(.+\); run it uncaptured$"
    with pytest.raises(CaptureError, match=message):
        graphed(indices, 1.0)
    assert graphed.graph is None
