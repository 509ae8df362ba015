import pytest
import torch

import fastvae
from fastvae import VAE

SMALL = dict(latent_dim=8, hidden_dims=(4, 8, 16, 32))


@pytest.mark.parametrize(
    "in_channels,image_size,blocks",
    [(3, 16, 2), (1, 32, 3), (3, 64, 4), (4, 128, 4)],
)
def test_shapes_for_sizes_and_channels(in_channels, image_size, blocks):
    model = VAE(in_channels=in_channels, image_size=image_size, backend="reference", **SMALL)
    x = torch.rand(3, in_channels, image_size, image_size)
    x_hat, mu, logvar = model(x)
    assert x_hat.shape == x.shape
    assert mu.shape == logvar.shape == (3, 8)
    assert 0 <= x_hat.min() and x_hat.max() <= 1
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == blocks
    # The smallest feature map is 4x4 once the image is large enough to need every block.
    assert model.fc_mu.in_features == SMALL["hidden_dims"][blocks - 1] * (image_size >> blocks) ** 2


def test_first_block_has_no_batchnorm():
    model = VAE(backend="reference", **SMALL)
    assert isinstance(model.encoder[0], torch.nn.Conv2d) and isinstance(model.encoder[1], torch.nn.ReLU)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.encoder) == 3
    assert isinstance(model.decoder[-1], torch.nn.Sigmoid)


def test_eval_is_deterministic_and_uses_mu():
    torch.manual_seed(0)
    model = VAE(image_size=16, backend="reference", **SMALL).eval()
    x = torch.rand(2, 3, 16, 16)
    a, mu, _ = model(x)
    b, _, _ = model(x)
    assert torch.equal(a, b)
    assert torch.equal(a, model.decode(mu))
    assert torch.equal(model.reconstruct(x), a)


def test_train_mode_samples():
    torch.manual_seed(0)
    model = VAE(image_size=16, backend="reference", **SMALL).train()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        model.decoder_input.weight.mul_(10)
    assert not torch.equal(model(x)[0], model(x)[0])


def test_loss_is_reference_loss_of_forward():
    model = VAE(image_size=16, backend="reference", **SMALL).eval()
    x = torch.rand(2, 3, 16, 16)
    x_hat, mu, logvar = model(x)
    parts = model.loss(x, beta=2.0, reduction="batchmean")
    want = fastvae.reference.vae_loss(x_hat, x, mu, logvar, beta=2.0, reduction="batchmean")
    for got, expected in zip(parts, want):
        torch.testing.assert_close(got, expected)
    parts.loss.backward()
    assert model.fc_mu.weight.grad is not None


@pytest.mark.parametrize("backend", ["auto", "cpp", "triton"])
def test_state_dict_loads_whatever_the_backend(backend):
    source = VAE(image_size=16, backend="reference", **SMALL)
    target = VAE(image_size=16, backend=backend, **SMALL)
    target.load_state_dict(source.state_dict())
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(source.eval()(x)[0], target.eval()(x)[0], rtol=0, atol=0)


def test_sample_interpolate_and_they_keep_the_mode():
    model = VAE(image_size=16, backend="reference", **SMALL).train()
    norm = next(m for m in model.encoder if isinstance(m, torch.nn.BatchNorm2d))
    running = norm.running_mean.clone()
    g = torch.Generator().manual_seed(1)
    assert model.sample(5, generator=g).shape == (5, 3, 16, 16)
    x1, x2 = torch.rand(3, 16, 16), torch.rand(3, 16, 16)
    path = model.interpolate(x1, x2, steps=4)
    assert path.shape == (4, 3, 16, 16)
    torch.testing.assert_close(path[0], model.reconstruct(x1[None])[0])
    torch.testing.assert_close(path[-1], model.reconstruct(x2[None])[0])
    assert model.interpolate(x1[None].repeat(2, 1, 1, 1), x2[None].repeat(2, 1, 1, 1), 3).shape == (2, 3, 3, 16, 16)
    assert model.training
    assert torch.equal(norm.running_mean, running)


@pytest.mark.parametrize(
    "x,message",
    [
        (torch.rand(2, 1, 16, 16), "x has 1 channels but the model expects 3"),
        (torch.rand(2, 3, 32, 32), "x has images of size 32x32 but the model expects 16x16"),
        (torch.rand(3, 16, 16), r"x must be a batch of images \(N, 3, 16, 16\), got shape \(3, 16, 16\)"),
    ],
)
def test_bad_images_raise(x, message):
    model = VAE(image_size=16, backend="reference", **SMALL)
    with pytest.raises(ValueError, match=message):
        model(x)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool, torch.complex64])
def test_images_that_are_not_floating_point_raise_type_error(dtype):
    model = VAE(image_size=16, backend="reference", **SMALL)
    x = torch.zeros(2, 3, 16, 16, dtype=dtype)
    message = rf"x must be floating-point images in \[0, 1\] of shape \(N, 3, 16, 16\), got a {dtype} tensor"
    for method in (model, model.reconstruct, lambda x: model.interpolate(x, x)):
        with pytest.raises(TypeError, match=message):
            method(x)


@pytest.mark.parametrize("training", [True, False])
def test_the_model_compiles_into_one_graph(training):
    # The images' checks read only metadata: no graph break, no host sync.
    model = VAE(image_size=16, backend="cpp", **SMALL).train(training)
    x = torch.rand(4, 3, 16, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    actual = compiled(x)
    torch.manual_seed(0)
    for a, e in zip(actual, model(x)):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    # Under fullgraph, dynamo reports an exception raised while tracing as Unsupported, with ours in it.
    with pytest.raises((TypeError, torch._dynamo.exc.Unsupported), match="x must be floating-point images"):
        compiled(x.to(torch.uint8))


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(image_size=48), ValueError, "power of two from 16 up, got 48"),
        (dict(image_size=8), ValueError, "power of two from 16 up, got 8"),
        (dict(latent_dim=0), ValueError, "latent_dim must be at least 1, got 0"),
        (dict(hidden_dims=()), ValueError, "hidden_dims must name at least one"),
        (dict(in_channels=2.0), TypeError, "in_channels must be an int, got float"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(recon="bernoulli"), ValueError, "recon must be one of 'mse', 'l1', 'bce', 'bce_logits', got 'bernoulli'"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        VAE(**kwargs)


def test_decode_checks_latent_shape():
    model = VAE(image_size=16, backend="reference", **SMALL)
    with pytest.raises(ValueError, match=r"z must have shape \(N, 8\), got \(2, 9\)"):
        model.decode(torch.zeros(2, 9))


@pytest.mark.parametrize("recon", ["l1", "bce", "bce_logits"])
def test_loss_uses_the_models_recon_and_split_reductions(recon):
    torch.manual_seed(0)
    model = VAE(image_size=16, backend="cpp" if fastvae.extension_error is None else "reference", recon=recon,
                **SMALL).eval()
    x = torch.rand(2, 3, 16, 16)
    x_hat, mu, logvar = model(x)
    parts = model.loss(x, beta=0.5, recon_reduction="mean", kl_reduction="batchmean")
    want = fastvae.reference.vae_loss(x_hat, x, mu, logvar, beta=0.5, recon=recon, recon_reduction="mean",
                                      kl_reduction="batchmean")
    for got, expected in zip(parts, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_bce_logits_decoder_outputs_logits_and_the_image_methods_apply_the_sigmoid():
    torch.manual_seed(0)
    logits_model = VAE(image_size=16, backend="reference", recon="bce_logits", **SMALL)
    assert not any(isinstance(m, torch.nn.Sigmoid) for m in logits_model.decoder)
    assert logits_model.config["recon"] == "bce_logits"
    assert "recon" not in VAE(image_size=16, **SMALL).config
    # The Sigmoid has no parameters: the same state_dict, and the images of an "mse" model.
    images_model = VAE(image_size=16, backend="reference", **SMALL)
    assert images_model.state_dict().keys() == logits_model.state_dict().keys()
    images_model.load_state_dict(logits_model.state_dict())
    x = torch.rand(2, 3, 16, 16)
    logits = logits_model.eval()(x)[0]
    assert logits.min() < 0 or logits.max() > 1
    torch.testing.assert_close(logits_model.reconstruct(x), torch.sigmoid(logits))
    torch.testing.assert_close(logits_model.reconstruct(x), images_model.reconstruct(x))
    generator = torch.Generator().manual_seed(1)
    samples = logits_model.sample(3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(samples, images_model.sample(3, generator=generator))
    path = logits_model.interpolate(x[0], x[1], steps=3)
    assert 0 <= path.min() and path.max() <= 1


def test_train_recon_option_reaches_the_loss_and_the_checkpoint(tmp_path):
    from fastvae import checkpoint
    from fastvae.cli import main

    argv = [
        "train", "--image-size", "16", "--hidden-dims", "8,16", "--latent-dim", "4", "--batch-size", "8",
        "--train-size", "16", "--eval-size", "8", "--device", "cpu", "--steps", "2", "--every", "2",
        "--recon", "bce_logits", "--recon-reduction", "mean", "--kl-reduction", "batchmean", "--out", str(tmp_path),
    ]
    assert main(argv) == 0
    ckpt = checkpoint.load(tmp_path / "ckpt.pt")
    assert ckpt["config"]["recon"] == "bce_logits"
    assert (ckpt["args"]["recon_reduction"], ckpt["args"]["kl_reduction"]) == ("mean", "batchmean")
    # What `fastvae sample`/`reconstruct` rebuild: a decoder without its Sigmoid, images through it.
    model = VAE(**ckpt["config"], backend="reference")
    model.load_state_dict(ckpt["model"])
    assert not any(isinstance(m, torch.nn.Sigmoid) for m in model.decoder)
    images = model.sample(4)
    assert 0 <= images.min() and images.max() <= 1
