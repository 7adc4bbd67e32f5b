"""LPIPS loss: loading torchvision-format VGG16 weights written by the test (file, torch hub cache,
safetensors), the clear error when they are missing, the VGG16 stack against hand-written
conv/relu/pool calls, the 0.5x resize, LPIPS(x, x) = 0, gradient to x_hat only, the t threshold,
and the whole loss against an independent plain-torch computation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prx.config import PerceptualConfig
from prx.hub import PretrainedMissing
from prx.recipe.lpips import LPIPSLoss, LPIPSWeightsMissing, downsample, load_vgg16_features

# torchvision vgg16().features: (index, in, out) of each 3x3 conv; ReLU after each; 2x2 max-pools
# at 4, 9, 16, 23 (i.e. before the convs at 5, 10, 17, 24); LPIPS taps the ReLUs of 2, 7, 14, 21, 28.
CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
         (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512),
         (28, 512, 512)]
POOL_BEFORE = {5, 10, 17, 24}
TAP_AFTER = {2, 7, 14, 21, 28}
CHANNELS = [64, 128, 256, 512, 512]


def vgg16_state(seed=0) -> dict[str, torch.Tensor]:
    """A torchvision-format VGG16 state dict with random (He-scaled) weights; the classifier
    entries are small stand-ins with torchvision's names (the loader must ignore them)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, cin, cout in CONVS:
        state[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        state[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.05
    state["classifier.0.weight"] = torch.randn(8, 4, generator=g)
    state["classifier.6.bias"] = torch.randn(3, generator=g)
    return state


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save(vgg16_state(), path)
    return path


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory):
    """Heads in the lpips package layout (weights/v0.1/vgg.pth): random, non-negative."""
    g = torch.Generator().manual_seed(1)
    path = tmp_path_factory.mktemp("heads") / "vgg.pth"
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(CHANNELS)}
    torch.save(heads, path)
    return path


@pytest.fixture(scope="module")
def lpips(vgg_file, heads_file):
    return LPIPSLoss.from_config(PerceptualConfig(lpips_weight=0.1, lpips_vgg=str(vgg_file),
                                                  lpips_heads=str(heads_file)))


def hand_vgg(x: torch.Tensor, state) -> list[torch.Tensor]:
    """VGG16 up to relu5_3 written out with F.conv2d / F.relu / F.max_pool2d."""
    taps = []
    for i, _, _ in CONVS:
        if i in POOL_BEFORE:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        x = F.relu(F.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))
        if i in TAP_AFTER:
            taps.append(x)
    return taps


def images(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_vgg16_loads_from_a_file_the_hub_cache_and_safetensors(vgg_file, tmp_path, monkeypatch):
    state = vgg16_state()
    expected = {k: v for k, v in state.items() if k.startswith("features.")}
    net = load_vgg16_features(vgg_file)
    assert net.state_dict().keys() == expected.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in expected.items())
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    # the torch hub cache: $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "vgg16-397923af.pth").symlink_to(vgg_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = load_vgg16_features()
    assert all(torch.equal(cached.state_dict()[k], v) for k, v in expected.items())
    from safetensors.torch import save_file
    save_file(expected, tmp_path / "vgg16.safetensors")
    st = load_vgg16_features(tmp_path / "vgg16.safetensors")
    assert all(torch.equal(st.state_dict()[k], v) for k, v in expected.items())
    # a file that is not VGG16 says so
    torch.save({"features.0.weight": torch.zeros(64, 3, 5, 5)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth is not a torchvision VGG16"):
        load_vgg16_features(tmp_path / "bad.pth")


def test_missing_weights_raise_a_clear_error(tmp_path, monkeypatch, vgg_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(LPIPSWeightsMissing) as info:
        load_vgg16_features()
    assert isinstance(info.value, PretrainedMissing)  # what train.py catches for every frozen tower
    message = str(info.value)
    assert str(tmp_path / "empty" / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert "perceptual.lpips_vgg" in message
    with pytest.raises(LPIPSWeightsMissing, match="not found at .*nowhere.pth"):
        load_vgg16_features(tmp_path / "nowhere.pth")
    with pytest.raises(LPIPSWeightsMissing, match="perceptual.lpips_heads"):
        LPIPSLoss.from_config(PerceptualConfig(lpips_vgg=str(vgg_file), lpips_heads=str(tmp_path / "no.pth")))


def test_feature_stack_equals_hand_written_vgg16(vgg_file):
    net, state = load_vgg16_features(vgg_file), vgg16_state()
    x = images(2, 3, 37, 45)  # odd sizes: every pool floors
    with torch.no_grad():
        taps, expected = net(x), hand_vgg(x, state)
    assert [t.shape[1] for t in taps] == CHANNELS
    assert [tuple(t.shape[2:]) for t in taps] == [(37, 45), (18, 22), (9, 11), (4, 5), (2, 2)]
    for tap, ref in zip(taps, expected, strict=True):
        torch.testing.assert_close(tap, ref, rtol=1e-5, atol=1e-6)
        assert ref.abs().max() > 0  # the random weights keep every tap alive


def test_downsample_half_bilinear_over_the_full_image():
    x = images(2, 3, 41, 57)
    assert downsample(x, 0.5).shape == (2, 3, 20, 28)
    assert downsample(images(1, 3, 40, 56), 0.5).shape == (1, 3, 20, 28)
    assert downsample(x, 1.0) is x
    # bilinear 0.5x without antialias on even sizes samples midway between pixel pairs: 2x2 means
    even = images(2, 3, 40, 56)
    torch.testing.assert_close(downsample(even, 0.5), F.avg_pool2d(even, 2), rtol=1e-6, atol=1e-6)


def test_lpips_of_an_image_with_itself_is_exactly_zero(lpips):
    x = images(2, 3, 40, 56)
    loss, per_sample = lpips(x.clone(), x), lpips.distance(x.clone(), x)
    assert loss.item() == 0.0 and torch.equal(per_sample, torch.zeros(2))


def test_gradient_reaches_x_hat_only(lpips):
    x_hat = images(2, 3, 40, 56, seed=1).requires_grad_(True)
    x = images(2, 3, 40, 56, seed=2).requires_grad_(True)
    loss, per_sample = lpips(x_hat, x), lpips.distance(x_hat, x)
    assert loss.item() > 0 and (per_sample > 0).all()
    loss.backward()
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
    assert x.grad is None
    assert not any(p.requires_grad or p.grad is not None for p in lpips.vgg.parameters())
    assert not any(h.requires_grad or h.grad is not None for h in lpips.heads)


def test_lpips_registers_nothing_in_the_module_that_keeps_it(lpips):
    holder = nn.Module()
    holder.lpips = lpips  # e.g. kept on the model: must not reach its checkpoint, optimizer or FSDP
    assert list(holder.state_dict()) == [] and list(holder.parameters()) == []
    holder.train()
    assert not lpips.vgg.training


def test_loss_equals_independent_plain_torch(lpips, heads_file):
    x_hat, x = images(2, 3, 40, 56, seed=3), images(2, 3, 40, 56, seed=4)
    loss, per_sample = lpips(x_hat, x), lpips.distance(x_hat, x)

    state = vgg16_state()
    raw = torch.load(heads_file, weights_only=True)
    heads = [raw[f"lin{i}.model.1.weight"].reshape(1, -1, 1, 1) for i in range(5)]
    shift = torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)  # lpips ScalingLayer
    scale = torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)

    def taps(img):
        small = F.avg_pool2d(img, 2)  # = bilinear 0.5x at even sizes (see the downsample test)
        return hand_vgg((small - shift) / scale, state)

    def unit(f):
        return f / (torch.sqrt((f ** 2).sum(1, keepdim=True)) + 1e-10)

    expected = sum(((unit(p) - unit(q)) ** 2 * w).sum(1).mean((1, 2))
                   for p, q, w in zip(taps(x_hat), taps(x), heads, strict=True))
    torch.testing.assert_close(per_sample, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, 0.1 * expected.mean(), rtol=1e-5, atol=1e-8)


def test_t_threshold_masks_samples_and_averages_over_the_whole_batch(vgg_file, heads_file):
    cfg = PerceptualConfig(lpips_weight=0.1, lpips_vgg=str(vgg_file), lpips_heads=str(heads_file),
                           lpips_t_max=0.5)
    lpips = LPIPSLoss.from_config(cfg)
    assert (lpips.weight, lpips.scale, lpips.t_max) == (0.1, 0.5, 0.5)
    x_hat = images(3, 3, 32, 48, seed=5).requires_grad_(True)
    x = images(3, 3, 32, 48, seed=6)
    t = torch.tensor([0.2, 0.9, 0.5])
    loss, per_sample = lpips(x_hat, x, t), lpips.distance(x_hat, x)
    assert (per_sample > 0).all()  # the distance of every sample is still reported
    torch.testing.assert_close(loss, 0.1 * (per_sample[0] + per_sample[2]) / 3)
    loss.backward()
    assert x_hat.grad[1].abs().max() == 0 and x_hat.grad[0].abs().max() > 0 and x_hat.grad[2].abs().max() > 0
    every = lpips(x_hat, x)  # no t: every sample counts
    torch.testing.assert_close(every, 0.1 * per_sample.mean())


def test_bf16_vgg_weights_run_and_stay_close(vgg_file, heads_file, lpips):
    """The VGG in bf16 (a GPU option): inputs are rounded once to its dtype; the distance stays fp32."""
    cfg = PerceptualConfig(lpips_weight=0.1, lpips_vgg=str(vgg_file), lpips_heads=str(heads_file))
    low = LPIPSLoss.from_config(cfg, dtype=torch.bfloat16)
    assert low.vgg.features[0].weight.dtype == torch.bfloat16 and low.heads[0].dtype == torch.float32
    x_hat, x = images(2, 3, 40, 56, seed=7).requires_grad_(True), images(2, 3, 40, 56, seed=8)
    loss, per_sample = low(x_hat, x), low.distance(x_hat, x)
    assert per_sample.dtype == torch.float32
    torch.testing.assert_close(per_sample, lpips.distance(x_hat, x), rtol=0.05, atol=0)
    loss.backward()
    assert x_hat.grad.dtype == torch.float32 and torch.isfinite(x_hat.grad).all()
