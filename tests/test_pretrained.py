"""A trained model in one line: VAE.from_checkpoint, save_pretrained/from_pretrained (config.json
and model.safetensors) and `fastvae export`; a damaged or hostile file is one CheckpointError."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastvae import VAE, checkpoint
from fastvae.checkpoint import CheckpointError
from fastvae.cli import main
from test_run_folder import gone_pid
from test_train import REPO, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train(out, "--steps", 4, "--every", 4, "--recon", "bce_logits") == 0
    return out


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """`fastvae export` of the run, as a user runs it."""
    out = tmp_path_factory.mktemp("export") / "vae"
    result = subprocess.run([sys.executable, "-m", "fastvae", "export", "--checkpoint", str(run / "ckpt.pt"),
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == f"wrote {out / 'model.safetensors'} and {out / 'config.json'}\n"
    return out


@pytest.fixture
def saved(exported, tmp_path):
    """A copy of the export, to damage."""
    return shutil.copytree(exported, tmp_path / "vae")


def outputs(model):
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return model.sample(6, generator=torch.Generator().manual_seed(2)), model.reconstruct(x), model(x)[0]


def test_train_export_from_pretrained_gives_the_checkpoints_model_bit_for_bit(run, exported):
    from_checkpoint = VAE.from_checkpoint(run / "ckpt.pt")
    from_pretrained = VAE.from_pretrained(exported)
    assert not from_pretrained.training and from_pretrained.config == from_checkpoint.config
    assert from_pretrained.config["recon"] == "bce_logits"
    weights = checkpoint.load(run / "ckpt.pt")["model"]
    for name, tensor in from_pretrained.state_dict().items():
        assert tensor.dtype == weights[name].dtype and torch.equal(tensor, weights[name]), name
    for a, b in zip(outputs(from_checkpoint), outputs(from_pretrained)):
        assert torch.equal(a, b)
    # The model load_model returns is the same one, beside its checkpoint.
    model, ckpt = checkpoint.load_model(run / "ckpt.pt")
    assert ckpt["step"] == 4 and all(map(torch.equal, outputs(model), outputs(from_pretrained)))


def test_the_files_are_what_diffusers_and_the_hub_expect(exported):
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((exported / "config.json").read_text())
    assert config == {"_class_name": "fastvae.VAE", "_fastvae_version": "0.1.0", "in_channels": 3, "image_size": 16,
                      "latent_dim": 4, "hidden_dims": [8, 16], "recon": "bce_logits"}
    assert set(load_file(exported / "model.safetensors")) == set(VAE(**{k: v for k, v in config.items()
                                                                       if not k.startswith("_")}).state_dict())


def test_save_pretrained_round_trips_in_python(tmp_path):
    model = VAE(1, 32, 3, (4, 8, 8))
    with torch.no_grad():
        model.encoder[3].running_var.uniform_(0.5, 2)  # buffers travel too
    folder = model.save_pretrained(tmp_path / "a" / "b")
    assert folder == tmp_path / "a" / "b"
    again = VAE.from_pretrained(folder, backend="reference")
    assert again.backend == "reference" and again.config == model.config
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    VAE(1, 32, 5, (4, 8, 8)).save_pretrained(folder)  # over an earlier save: replaced whole
    assert VAE.from_pretrained(folder).latent_dim == 5


def test_half_precision_weights_load_into_the_float32_model(tmp_path):
    model = VAE(3, 16, 4, (8, 16))
    model.half().save_pretrained(tmp_path)
    loaded = VAE.from_pretrained(tmp_path)
    assert loaded.fc_mu.weight.dtype == torch.float32
    assert torch.equal(loaded.fc_mu.weight, model.fc_mu.weight.float())


def _config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _weights(folder, change):
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "spoil, where, reason",
    [
        (lambda f: (f / "config.json").write_text("{\"in_channels\": 3,"), "config.json", "not a readable config (Expecting"),
        (lambda f: (f / "config.json").write_bytes(b"\xff\xfe"), "config.json", "not a readable config ("),
        (lambda f: (f / "config.json").write_text("[3, 16]"), "config.json",
         "not a model config (it should be a JSON object, got list)"),
        (lambda f: _config(f, latent_dim=float("nan")), "config.json", "not a readable config (NaN is not JSON)"),
        (lambda f: (f / "config.json").write_text('{"image_size": 16}'), "config.json",
         "not a model config (no in_channels, latent_dim, hidden_dims in it)"),
        (lambda f: _config(f, _class_name="AutoencoderKL"), "config.json",
         "the config of a 'AutoencoderKL', not of a fastvae.VAE"),
        (lambda f: (f / "config.json").unlink(), "config.json", "no such file"),
        (lambda f: (f / "model.safetensors").unlink(), "model.safetensors", "no such file"),
        (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-7]),
         "model.safetensors", "not a readable safetensors file ("),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x08" + bytes(7) + b"{}garbage"),
         "model.safetensors", "not a readable safetensors file ("),
        (lambda f: (f / "model.safetensors").write_bytes(bytes(100)), "model.safetensors", "not a readable safetensors file ("),
        (lambda f: _flip_last_weight_byte(f / "model.safetensors"), "model.safetensors",
         "damaged: its weights do not match the digest saved with them"),
        (lambda f: _config(f, latent_dim=5), "", "its model cannot be rebuilt (fc_mu.weight is torch.float32 of shape "
         "(4, 256), where its config gives torch.float32 of shape (5, 256))"),
        (lambda f: _config(f, hidden_dims=[10**6, 10**6]), "", "its model cannot be rebuilt (encoder.0.weight is "
         "torch.float32 of shape (8, 3, 4, 4), where its config gives torch.float32 of shape (1000000, 3, 4, 4))"),
        (lambda f: _config(f, hidden_dims=[10**9, 10**9]), "", "its model cannot be rebuilt (Storage size calculation"),
        (lambda f: _config(f, latent_dim="4"), "", "its model cannot be rebuilt (latent_dim must be an int, got str)"),
        (lambda f: _config(f, depth=3), "", "its model cannot be rebuilt (VAE.__init__() got an unexpected keyword"),
        (lambda f: _weights(f, lambda w: w.__setitem__("fc_mu.bias", w["fc_mu.bias"].int())), "",
         "its model cannot be rebuilt (fc_mu.bias is torch.int32 of shape (4,), where its config gives torch.float32"),
        (lambda f: _weights(f, lambda w: w.pop("fc_mu.bias")), "", "its model cannot be rebuilt (no 'fc_mu.bias' in it)"),
        (lambda f: _weights(f, lambda w: w.__setitem__("extra", torch.zeros(1))), "",
         "its model cannot be rebuilt ('extra' is not a weight of the model its config describes)"),
    ],
)
def test_a_damaged_or_hostile_folder_is_one_error_naming_the_file(saved, spoil, where, reason):
    spoil(saved)
    with pytest.raises(CheckpointError) as caught:
        VAE.from_pretrained(saved)
    message = str(caught.value)
    assert message.startswith(f"{saved / where if where else saved}: {reason}") and "\n" not in message, message


def _flip_last_weight_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x04
    path.write_bytes(bytes(data))


def test_from_pretrained_of_a_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        VAE.from_pretrained(tmp_path / "none")


def test_from_checkpoint_refuses_a_config_too_large_to_build_without_building_it(tmp_path):
    model = VAE(3, 16, 4, (8, 16))
    config = {**model.config, "hidden_dims": [2**40, 16]}  # about 2**46 weights, were it allocated
    checkpoint.save({"model": model.state_dict(), "config": config, "step": 0}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"its model cannot be rebuilt \(encoder.0.weight is torch.float32 of "
                                              r"shape \(8, 3, 4, 4\), where its config gives torch.float32 of shape"):
        VAE.from_checkpoint(tmp_path / "ckpt.pt")


def test_export_refuses_a_folder_that_holds_other_files(run, tmp_path, capsys):
    argv = ["export", "--checkpoint", str(run / "ckpt.pt"), "--out"]
    assert main([*argv, str(run)]) == 2
    assert capsys.readouterr().err == (
        f"fastvae export: error: --out {run} holds files other than an export's (.fastvae.lock, ckpt.pt, "
        "interpolations_000004.png, ...); name a new or empty folder\n"
    )
    (tmp_path / "file").write_text("")
    assert main([*argv, str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == f"fastvae export: error: --out {tmp_path / 'file'} is a file; name a folder\n"
    (tmp_path / "empty").mkdir()
    assert main([*argv, str(tmp_path / "empty")]) == 0
    assert main([*argv, str(tmp_path / "empty")]) == 0  # an earlier export: replaced
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["config.json", "model.safetensors"]


def export(run, out):
    """`fastvae export` of the run into ``out``, in a process of its own, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "fastvae", "export", "--checkpoint", str(run / "ckpt.pt"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_export_deletes_the_temporaries_that_a_killed_export_left(run, saved):
    dead = gone_pid()
    for name in (f"model.safetensors.{dead}.0123abcd.tmp", f"config.json.{dead}.89abcdef.tmp"):
        (saved / name).write_bytes(b"half a file")
    result = export(run, saved)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == f"wrote {saved / 'model.safetensors'} and {saved / 'config.json'}\n"
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    expected = VAE.from_checkpoint(run / "ckpt.pt").state_dict()
    for name, tensor in VAE.from_pretrained(saved).state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize(
    "name",
    [
        "model.safetensors.{live}.0123abcd.tmp",  # a running export's (this test's process stands for it)
        "notes.txt.{dead}.0123abcd.tmp",  # a dead writer's, but of a file no export writes
        "config.json.{dead}.xyz.tmp",  # not a name write_atomically gives
    ],
)
def test_export_refuses_a_running_exports_temporary_and_any_not_its_own(run, saved, name):
    name = name.format(live=os.getpid(), dead=gone_pid())
    (saved / name).write_bytes(b"half a file")
    result = export(run, saved)
    assert result.returncode == 2
    assert result.stderr == (f"fastvae export: error: --out {saved} holds files other than an export's ({name}); "
                             "name a new or empty folder\n")
    assert (saved / name).read_bytes() == b"half a file"


def test_export_of_a_damaged_checkpoint_is_one_line(run, tmp_path):
    data = bytearray((run / "ckpt.pt").read_bytes())
    data[len(data) // 3] ^= 0xFF
    (tmp_path / "ckpt.pt").write_bytes(bytes(data))
    result = subprocess.run([sys.executable, "-m", "fastvae", "export", "--checkpoint", str(tmp_path / "ckpt.pt"),
                             "--out", str(tmp_path / "vae")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith(f"fastvae export: error: {tmp_path / 'ckpt.pt'}: ")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "vae").exists()
