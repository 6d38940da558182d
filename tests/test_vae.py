"""vae.py: parity with diffusers' AutoencoderKL (float64, tolerance 1e-10), presets, scaling, bad input."""
import json

import pytest
import torch

import weights
from vae import PRESETS, VAE, VAEConfig

diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=(8, 16, 16), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4, latent_channels=4, sample_size=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random diffusers AutoencoderKL in an SD-style root folder (vae/ inside), weights perturbed."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**TINY, scaling_factor=0.25).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(root / "vae", safe_serialization=True)
    return root, ref.double()


def test_parity_with_diffusers(saved):
    root, ref = saved
    ours = VAE.from_pretrained(root, dtype=torch.float64)  # the SD root: reads vae/
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 24, 20, generator=g, dtype=torch.float64) * 2 - 1  # sides not powers of two
    z = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        dist = ref.encode(x).latent_dist
        torch.testing.assert_close(mean, dist.mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(logvar, dist.logvar, rtol=0, atol=1e-10)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, rtol=0, atol=1e-10)
    assert mean.shape == (2, 4, 6, 5)


def test_scaling_factor_from_config(saved):
    root, ref = saved
    ours = VAE.from_pretrained(root / "vae")  # the vae folder itself
    assert ours.config.scaling_factor == 0.25
    z = torch.randn(1, 4, 4, 4)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.decode_latents(z), (ours.decode(z / 0.25) / 2 + 0.5).clamp(0, 1))
    # a posterior sample times the scaling factor, as the authors feed the UNet: same draw as diffusers' sample()
    ours64, x64 = VAE.from_pretrained(root, dtype=torch.float64), x.double()
    with torch.no_grad():
        sample = ours64.encode_latents(x64, torch.Generator().manual_seed(0))
        want = ref.encode(x64).latent_dist.sample(generator=torch.Generator().manual_seed(0)) * 0.25
        torch.testing.assert_close(sample, want, rtol=0, atol=1e-10)
        # sample=False: the posterior mean, the same on every call (what drawing_nll compares texts on)
        mean = ours64.encode_latents(x64, sample=False)
        torch.testing.assert_close(mean, ref.encode(x64).latent_dist.mean * 0.25, rtol=0, atol=1e-10)
        assert torch.equal(mean, ours64.encode_latents(x64, sample=False)) and not torch.equal(mean, sample)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_match_diffusers_keys(name):
    """Every preset has exactly the state-dict keys and shapes of the diffusers AutoencoderKL of that config."""
    c = PRESETS[name]
    fields = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
              "down_block_types", "up_block_types", "norm_num_groups")
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**{f: getattr(c, f) for f in fields})
        ours = VAE(c)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_missing_config(tmp_path):
    with pytest.raises(weights.WeightsError, match=r"config\.json: file not found"):
        VAE.from_pretrained(tmp_path)


def test_missing_weights(saved, tmp_path):
    root, _ = saved
    (tmp_path / "config.json").write_text((root / "vae" / "config.json").read_text())
    with pytest.raises(weights.WeightsError, match=r"no model\.safetensors or diffusion_pytorch_model\.safetensors"):
        VAE.from_pretrained(tmp_path)


def test_unsupported_config(saved, tmp_path):
    root, _ = saved
    config = json.loads((root / "vae" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "shift_factor": 0.1159}))
    with pytest.raises(ValueError, match=r"config\.json: shift_factor = 0\.1159 is not supported"):
        VAE.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"VAEConfig: down_block_types must be 2 x 'DownEncoderBlock2D'"):
        VAEConfig(block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2)


def test_wrong_channels():
    vae = VAE(PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"VAE\.decode: z must be \(B, 4, h, w\) \(config\.latent_channels\), "
                                         r"got \(1, 3, 4, 4\)"):
        vae.decode(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"VAE\.encode: x must be \(B, 3, H, W\) \(config\.in_channels\)"):
        vae.encode(torch.randn(1, 4, 8, 8))
