"""patch() on every diffusers autoencoder whose encode builds a DiagonalGaussianDistribution.

The classes come from diffusers itself (fastvae.integrations.diffusers.posterior_methods), not a
list kept here; each needs a tiny config below (built here, nothing downloaded), and
test_every_patchable_class_has_a_tiny_config fails for a class diffusers adds until it has one.
diffusers' DiagonalGaussianDistribution sums the KL over dims 1, 2 and 3 whatever the rank: (B,)
for image latents, (B, W) for video's (B, C, T, H, W), an IndexError for audio's (B, C, T), where
the tests compare the sum over dims 1 and 2 with diffusers' formula on its own attributes.
Oobleck's posterior (AutoencoderOobleck, Cosmos3's audio tokenizer) has a softplus scale and a
scalar KL, fastvae.distributions.OobleckGaussian.
"""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from scipy import stats

from fastvae import ops
from fastvae.distributions import DiagonalGaussian, OobleckGaussian, philox_seed
from fastvae.integrations import diffusers as integration
from fastvae.integrations.diffusers import is_patched, patch, posterior_methods, unpatch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install fastvae[diffusers])")
import diffusers.models.autoencoders as autoencoders  # noqa: E402
import diffusers.models.autoencoders.autoencoder_oobleck as diffusers_oobleck  # noqa: E402
import diffusers.models.autoencoders.vae as diffusers_vae  # noqa: E402
from diffusers.models.autoencoders.autoencoder_oobleck import OobleckDiagonalGaussianDistribution  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402

# diffusers' posterior classes and fastvae's stand-ins.
STAND_IN = {DiagonalGaussianDistribution: DiagonalGaussian, OobleckDiagonalGaussianDistribution: OobleckGaussian}

KL_WEIGHT = 1e-2  # large enough that the KL's gradients show in the parameters'
ZEROS4, ONES4 = [0.0] * 4, [1.0] * 4


def _allegro_one_tile(vae):
    # Allegro encodes only in tiles (24 frames, overlaps of 120 and 80 pixels, fixed in its
    # constructor): the tiny model takes one tile the size of its input.
    vae.enable_tiling()
    vae.kernel = vae.stride = (8, 16, 16)


def _decode_with_num_frames(vae, z):
    return vae.decode(z, num_frames=z.shape[0]).sample


def _decode_to_tensor(vae, z):
    return vae.decode(z)


# class name: (config, input shape, {"setup": fn(vae), "decode": fn(vae, z) -> tensor}). Channel
# counts of 32 where the class fixes its GroupNorm at 32 groups.
TINY = {
    "AutoencoderKL": (dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                           block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4),
                      (2, 3, 16, 16), {}),
    "AsymmetricAutoencoderKL": (dict(down_block_out_channels=(8,), up_block_out_channels=(8,), norm_num_groups=4,
                                     latent_channels=4), (2, 3, 16, 16), {}),
    "AutoencoderKLTemporalDecoder": (dict(block_out_channels=(32,), latent_channels=4), (2, 3, 8, 8),
                                     {"decode": _decode_with_num_frames}),
    "AutoencoderKLAllegro": (dict(block_out_channels=(8, 8), down_block_types=("AllegroDownBlock3D",) * 2,
                                  up_block_types=("AllegroUpBlock3D",) * 2, temporal_downsample_blocks=(True, False),
                                  temporal_upsample_blocks=(True, False), norm_num_groups=4, layers_per_block=1,
                                  latent_channels=4, temporal_compression_ratio=2, sample_size=16),
                             (1, 3, 8, 16, 16), {"setup": _allegro_one_tile}),
    "AutoencoderKLCogVideoX": (dict(block_out_channels=(8,) * 4, norm_num_groups=4, layers_per_block=1,
                                    latent_channels=4), (2, 3, 5, 16, 16), {}),
    "AutoencoderKLFlux2": (dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                                latent_channels=4), (2, 3, 16, 16), {}),
    "AutoencoderKLHunyuanImage": (dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                                       layers_per_block=1, spatial_compression_ratio=2, sample_size=16),
                                  (2, 3, 8, 8), {}),
    "AutoencoderKLHunyuanImageRefiner": (dict(latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                                              spatial_compression_ratio=4, temporal_compression_ratio=2),
                                         (1, 3, 5, 16, 16), {}),
    "AutoencoderKLHunyuanVideo": (dict(latent_channels=4, block_out_channels=(8,) * 4,
                                       down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                       up_block_types=("HunyuanVideoUpBlock3D",) * 4, layers_per_block=1,
                                       norm_num_groups=4), (2, 3, 5, 16, 16), {}),
    "AutoencoderKLHunyuanVideo15": (dict(latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                                         spatial_compression_ratio=4, temporal_compression_ratio=2),
                                    (1, 3, 5, 16, 16), {}),
    "AutoencoderKLKVAE": (dict(channels=32, num_enc_blocks=1, num_dec_blocks=1, z_channels=4, ch_mult=(1, 1)),
                          (2, 3, 8, 8), {}),
    "AutoencoderKLKVAEAudio": (dict(encoder_dim=4, encoder_rates=[2, 2], latent_dim=8, codebook_dim=4, decoder_dim=16,
                                    decoder_rates=[2, 2], attn_num_heads=2), (2, 1, 64), {}),
    "AutoencoderKLKVAEVideo": (dict(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=4, temporal_compress_times=2),
                               (1, 3, 5, 8, 8), {}),
    "AutoencoderKLLTXVideo": (dict(latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                                   layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5, patch_size=1),
                              (1, 3, 9, 16, 16), {}),
    "AutoencoderKLLTX2Video": (dict(latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 3,
                                    layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 4, patch_size=1,
                                    upsample_residual=(False,) * 3, upsample_factor=(1,) * 3),
                               (1, 3, 9, 16, 16), {}),
    "AutoencoderKLLTX2Audio": (dict(base_channels=8, ch_mult=(1, 2), num_res_blocks=1, latent_channels=4, mel_bins=16,
                                    resolution=16), (2, 2, 8, 16), {}),
    "AutoencoderKLMagvit": (dict(latent_channels=4, block_out_channels=(8,) * 4, norm_num_groups=4,
                                 layers_per_block=1), (1, 3, 9, 16, 16), {}),
    "AutoencoderKLMiniMaxH3": (dict(latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                                    spatial_downsample_factors=(2, 1), temporal_downsample_factors=(2, 1),
                                    norm_num_groups=4, decoder_num_layers=1, decoder_num_attention_heads=2,
                                    decoder_attention_head_dim=8, latents_mean=ZEROS4, latents_std=ONES4,
                                    clip_length=5, token_drop=0), (1, 3, 5, 16, 16), {}),
    "AutoencoderKLMochi": (dict(encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
                                latent_channels=4, layers_per_block=(1,) * 5, latents_mean=ZEROS4, latents_std=ONES4,
                                add_attention_block=(False,) * 5), (1, 3, 7, 16, 16), {}),
    "AutoencoderKLQwenImage": (dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                    latents_mean=ZEROS4, latents_std=ONES4), (1, 3, 1, 16, 16), {}),
    "AutoencoderKLQwenImage21": (dict(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                                      temperal_downsample=[False], latents_mean=ZEROS4, latents_std=ONES4,
                                      in_channels=3, out_channels=3), (1, 3, 1, 16, 16), {}),
    "AutoencoderKLWan": (dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                              latents_mean=ZEROS4, latents_std=ONES4), (2, 3, 5, 16, 16), {}),
    "AutoencoderVidTok": (dict(ch=8, ch_mult=[1, 2], z_channels=4, num_res_blocks=1), (1, 3, 9, 16, 16),
                          {"decode": _decode_to_tensor}),
    "ConsistencyDecoderVAE": (dict(encoder_block_out_channels=(8, 16), encoder_down_block_types=("DownEncoderBlock2D",) * 2,
                                   encoder_layers_per_block=1, encoder_norm_num_groups=4,
                                   decoder_block_out_channels=(8, 16),
                                   decoder_down_block_types=("ResnetDownsampleBlock2D",) * 2,
                                   decoder_up_block_types=("ResnetUpsampleBlock2D",) * 2, decoder_layers_per_block=1,
                                   decoder_norm_num_groups=4), (2, 3, 16, 16), {}),
    "Kandinsky6SRVAE": (dict(latent_channels=4, encoder_block_out_channels=(8,) * 3,
                             decoder_block_out_channels=(8,) * 3, layers_per_block=1), (1, 3, 5, 16, 16), {}),
    "AutoencoderOobleck": (dict(encoder_hidden_size=8, downsampling_ratios=[2, 2], decoder_channels=4,
                                decoder_input_channels=4, channel_multiples=[1, 2]), (2, 2, 64), {}),
    "Cosmos3AVAEAudioTokenizer": (dict(vocoder_input_dim=4, dec_dim=8, dec_c_mults=(1, 2), dec_strides=(2, 2), enc_dim=8,
                                       enc_intermediate_dim=16, enc_num_layers=1, enc_num_blocks=1, enc_latent_dim=8,
                                       enc_c_mults=(1, 2), enc_strides=(2, 2), hop_size=4, sampling_rate=16000),
                                  (2, 2, 256), {"decode": _decode_to_tensor}),
    "MMAudioVAE": (dict(mel_bins=16, latent_channels=4, hidden_channels=8, channel_multipliers=(1, 2),
                        layers_per_block=1, n_fft=64, hop_length=16, sample_rate=16000), (2, 1024), {}),
}


def _classes(with_posterior: bool) -> list[str]:
    names = (name for name in dir(autoencoders) if isinstance(getattr(autoencoders, name), type))
    return sorted(name for name in names if bool(posterior_methods(getattr(autoencoders, name))) == with_posterior)


PATCHABLE, REFUSED = _classes(True), _classes(False)
TESTED = [name for name in PATCHABLE if name in TINY]
# Classes whose models torch cannot deep-copy, patched or not: their weight_norm keeps each
# weight as a non-leaf tensor (torch's copy.deepcopy refuses those).
NO_DEEPCOPY = {"AutoencoderOobleck", "Cosmos3AVAEAudioTokenizer"}


def tiny(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The class's tiny model, the same weights at each call, and its input in [-1, 1]."""
    config, shape, hooks = TINY[name]
    torch.manual_seed(0)
    vae = getattr(autoencoders, name)(**config)
    if "setup" in hooks:
        hooks["setup"](vae)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return vae, x


def encode(vae, x: torch.Tensor):
    """``vae.encode(x).latent_dist``, with torch's generator reseeded for the models with dropout."""
    torch.manual_seed(2)
    return vae.encode(x).latent_dist


def decode(name: str, vae, z: torch.Tensor) -> torch.Tensor:
    hook = TINY[name][2].get("decode")
    return hook(vae, z) if hook else vae.decode(z).sample


def kl_of(posterior) -> torch.Tensor:
    """The posterior's own KL; for audio latents (B, C, T) of diffusers' DiagonalGaussianDistribution,
    whose kl() raises, the sum over dims 1 and 2: fastvae's kl(dims=(1, 2)), or diffusers' formula."""
    if posterior.mean.dim() > 3 or isinstance(posterior, (OobleckGaussian, OobleckDiagonalGaussianDistribution)):
        return posterior.kl()
    if isinstance(posterior, DiagonalGaussian):
        return posterior.kl(dims=(1, 2))
    return 0.5 * torch.sum(posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar, dim=[1, 2])


def kernel_eps(shape, generator, device, dtype, **_):
    """The noise the fused kernels draw for ``generator``, in place of diffusers' randn_tensor."""
    zeros = torch.zeros(shape, device=device, dtype=dtype)
    return ops.reparameterize(zeros, zeros, seed=philox_seed(generator))


def test_every_patchable_class_has_a_tiny_config():
    # A class diffusers adds that builds the posterior needs a config here to be tested.
    assert set(PATCHABLE) == set(TINY), sorted(set(PATCHABLE) ^ set(TINY))
    # What this diffusers gives: the video, image and audio autoencoders named in the README.
    assert {"AutoencoderKL", "AutoencoderKLWan", "AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo",
            "AutoencoderKLCogVideoX", "AutoencoderKLMochi", "AutoencoderKLFlux2", "AutoencoderKLQwenImage"} <= set(PATCHABLE)


@pytest.mark.parametrize("name", REFUSED)
def test_classes_without_the_posterior_are_refused(name):
    cls = getattr(autoencoders, name)
    with pytest.raises(TypeError, match=rf"got the class {name}: no method of {name} builds one"):
        patch(cls)
    with pytest.raises(TypeError, match=rf"no method of {name} builds one"):
        is_patched(cls)


def test_an_instance_without_the_posterior_is_refused():
    vq = autoencoders.VQModel(block_out_channels=(8,), norm_num_groups=4, latent_channels=2, num_vq_embeddings=4)
    with pytest.raises(TypeError, match=r"got VQModel: no method of VQModel builds one, so there is no posterior"):
        patch(vq)


@pytest.mark.parametrize("name", TESTED)
def test_patched_posterior_equals_diffusers(name):
    vae, x = tiny(name)
    with torch.no_grad():
        theirs = encode(vae, x)
        patch(vae)
        ours = encode(vae, x)
    assert type(ours) is STAND_IN[type(theirs)] and is_patched(vae)
    # The encoder ran the same way: the moments and the clamped halves are the same bits.
    for attribute in ("parameters", "mean", "logvar"):
        torch.testing.assert_close(getattr(ours, attribute), getattr(theirs, attribute), atol=0, rtol=0, msg=attribute)
    torch.testing.assert_close(ours.mode(), theirs.mode(), atol=0, rtol=0)
    for attribute in ("std", "var"):
        torch.testing.assert_close(getattr(ours, attribute), getattr(theirs, attribute), msg=attribute)
    # Sums in float32 in another order; the same dims, so the same shapes.
    kl, expected = kl_of(ours), kl_of(theirs)
    assert kl.shape == expected.shape and kl.dtype == torch.float32
    torch.testing.assert_close(kl, expected, atol=1e-4, rtol=1e-5)
    z = theirs.sample(torch.Generator().manual_seed(0))
    if hasattr(theirs, "nll"):  # Oobleck's has none
        dims = [1, 2] if z.dim() == 3 else [1, 2, 3]
        nll, expected_nll = ours.nll(z, dims=dims), theirs.nll(z, dims=dims)
        assert nll.shape == expected_nll.shape
        torch.testing.assert_close(nll, expected_nll, atol=1e-3, rtol=1e-5)
    assert unpatch(vae) is vae and not is_patched(vae)
    assert type(encode(vae, x)) is type(theirs)


@pytest.mark.parametrize("name", TESTED)
def test_patched_samples_are_the_kernel_draws_and_gaussian(name):
    vae, x = tiny(name)
    with torch.no_grad():
        posterior = encode(patch(vae), x)
        generator = torch.Generator().manual_seed(3)
        z = posterior.sample(generator)
        # The fused kernels' draw for the generator's seed, then N(0, 1) when standardized.
        seed = philox_seed(torch.Generator().manual_seed(3))
        torch.testing.assert_close(z, ops.reparameterize(posterior.mean, posterior.logvar, seed=seed), atol=0, rtol=0)
        standardized = torch.cat([((posterior.sample(generator) - posterior.mean) / posterior.std).flatten()
                                  for _ in range(max(1, 2000 // posterior.mean.numel()))])
    assert stats.kstest(standardized.double().numpy(), "norm").pvalue > 1e-3


@pytest.mark.parametrize("name", TESTED)
def test_training_step_matches_diffusers_given_the_same_z(name, monkeypatch):
    # The usual recipe: reconstruction MSE (against the input where decode gives its shape) plus
    # kl_weight times the mean of the posterior's KL.
    theirs, x = tiny(name)
    ours = patch(tiny(name)[0])
    losses = []
    for vae in (ours, theirs):
        if vae is theirs:
            # diffusers' sample() draws eps with randn_tensor: hand it the kernel's eps for the same seed.
            monkeypatch.setattr(diffusers_vae, "randn_tensor", kernel_eps)
            monkeypatch.setattr(diffusers_oobleck, "randn_tensor", kernel_eps)
        posterior = encode(vae, x)
        x_hat = decode(name, vae, posterior.sample(torch.Generator().manual_seed(11)))
        target = x if x_hat.shape == x.shape else torch.linspace(-1, 1, x_hat.numel()).view(x_hat.shape)
        losses.append(F.mse_loss(x_hat, target) + KL_WEIGHT * kl_of(posterior).mean())
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)
    compared = 0
    for (parameter, ours_p), theirs_p in zip(ours.named_parameters(), theirs.parameters()):
        assert (ours_p.grad is None) == (theirs_p.grad is None), parameter
        if ours_p.grad is not None:
            # z differs from diffusers' by float32 rounding (the kernel's fused multiply-add), which
            # moves each gradient by rounding of its tensor's scale, not of each element; gradients
            # that are zero but for rounding (attention's key bias) by rounding of 1e-6 or so.
            atol = max(1e-6, 1e-4 * theirs_p.grad.abs().max().item())
            torch.testing.assert_close(ours_p.grad, theirs_p.grad, atol=atol, rtol=1e-4,
                                       msg=lambda m: f"{parameter}: {m}")
            compared += 1
    assert compared > 0


@pytest.mark.parametrize("name", TESTED)
def test_patch_keeps_the_model_and_its_copies(name, tmp_path):
    vae, x = tiny(name)
    untouched = tiny(name)[0]
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    patch(vae)
    patch(vae)  # twice is once
    assert dict(vae.config) == dict(untouched.config)
    assert state.keys() == vae.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in vae.state_dict().items())
    # save_pretrained writes what the unpatched model writes (reloading is diffusers' business:
    # some classes need accelerate for it).
    vae.save_pretrained(tmp_path / "patched")
    untouched.save_pretrained(tmp_path / "plain")
    for path in (tmp_path / "plain").iterdir():
        written = (tmp_path / "patched" / path.name).read_bytes()
        if path.suffix == ".safetensors":
            ours, theirs = safetensors.torch.load(written), safetensors.torch.load(path.read_bytes())
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        else:
            assert written == path.read_bytes(), path.name
    if name in NO_DEEPCOPY:
        with pytest.raises(RuntimeError, match="deepcopy"):
            copy.deepcopy(untouched)
        return
    # A deep copy (an EMA model, say) is patched and encodes with its own weights.
    clone = copy.deepcopy(vae)
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
        assert is_patched(clone) and isinstance(encode(clone, x), DiagonalGaussian)
        assert not torch.equal(encode(clone, x).mean, encode(vae, x).mean)


@pytest.mark.parametrize("name", TESTED)
def test_forward_goes_through_the_patched_encode(name, monkeypatch):
    built = []

    def recording(stand_in):
        class Recording(stand_in):
            def __init__(self, *args, **kwargs):
                built.append(self)
                super().__init__(*args, **kwargs)

        return Recording

    monkeypatch.setattr(integration, "DiagonalGaussian", recording(DiagonalGaussian))
    monkeypatch.setattr(integration, "OobleckGaussian", recording(OobleckGaussian))
    vae, x = tiny(name)
    with torch.no_grad():
        torch.manual_seed(3)
        expected = vae(x).sample
        torch.manual_seed(3)
        output = patch(vae)(x).sample
    assert len(built) == 1
    # forward decodes the posterior's mode unless asked to sample (then the noise differs).
    assert output.shape == expected.shape


def test_patch_the_video_class_and_a_subclass():
    class Subclass(autoencoders.AutoencoderKLWan):
        pass

    vae, x = tiny("AutoencoderKLWan")
    try:
        patch(autoencoders.AutoencoderKLWan)
        assert is_patched(autoencoders.AutoencoderKLWan) and is_patched(vae) and is_patched(Subclass)
        with torch.no_grad():
            assert type(vae.encode(x).latent_dist) is DiagonalGaussian
            assert type(vae.encode(x, return_dict=False)[0]) is DiagonalGaussian
    finally:
        unpatch(autoencoders.AutoencoderKLWan)
    assert not is_patched(autoencoders.AutoencoderKLWan)
    patch(Subclass)
    assert "encode" in vars(Subclass) and not is_patched(autoencoders.AutoencoderKLWan)
    unpatch(Subclass)
    assert "encode" not in vars(Subclass)  # inherited again, not pinned


def test_a_quantizing_vidtok_passes_through():
    # AutoencoderVidTok's encode builds the posterior only for regularizer="kl"; with a quantizer
    # it returns tensors, which the patched encode leaves alone.
    config, shape, _ = TINY["AutoencoderVidTok"]
    torch.manual_seed(0)
    vae = patch(autoencoders.AutoencoderVidTok(**{**config, "regularizer": "fsq", "codebook_size": 8**4, "double_z": False}))
    x = torch.rand(shape) * 2 - 1
    with torch.no_grad():
        output = vae.encode(x)
    assert isinstance(output, tuple) and all(isinstance(t, torch.Tensor) for t in output)


@pytest.mark.parametrize("channels_last", [False, True])
def test_5d_posterior_equals_diffusers_in_either_layout(channels_last):
    moments = torch.randn(2, 8, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    moments[:, 4:].clamp_(-3, 1)
    if channels_last:
        moments = moments.to(memory_format=torch.channels_last_3d)
    ours, theirs = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    for attribute in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, attribute), getattr(theirs, attribute), atol=0, rtol=0)
    z = theirs.sample(torch.Generator().manual_seed(0))
    assert ours.sample(torch.Generator().manual_seed(0)).stride() == z.stride()
    torch.testing.assert_close(ours.kl(), theirs.kl(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours.kl(dims=(1, 2, 3, 4)), theirs.kl().sum(1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours.kl(theirs), theirs.kl(theirs), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours.nll(z), theirs.nll(z), atol=1e-3, rtol=1e-5)


def test_oobleck_posterior_equals_diffusers_on_moments():
    moments = torch.randn(3, 8, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moments[:, 4:].mul_(3)  # softplus far into both tails
    moments = moments.float().requires_grad_()
    ours, theirs = OobleckGaussian(moments), OobleckDiagonalGaussianDistribution(moments)
    for attribute in ("mean", "scale", "std", "var", "logvar"):
        torch.testing.assert_close(getattr(ours, attribute), getattr(theirs, attribute), atol=0, rtol=0)
    kl, expected = ours.kl(), theirs.kl()
    assert kl.shape == () and kl.dtype == torch.float32
    torch.testing.assert_close(kl, expected, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(kl, moments)
    (expected_grad,) = torch.autograd.grad(expected, moments)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-4)
    other = OobleckDiagonalGaussianDistribution(torch.randn(3, 8, 9, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(ours.kl(other), theirs.kl(other), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours.kl(ours), torch.tensor(0.0), atol=1e-5, rtol=0)
    assert OobleckGaussian(torch.zeros(0, 8, 3)).kl().isnan()  # the mean over no samples, as diffusers'
    with pytest.raises(TypeError, match="other must be a Gaussian .* got int"):
        ours.kl(3)
