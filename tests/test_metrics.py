"""Quality metrics: FID and MMD against independent implementations; the feature nets from small
random models the tests write; the reference-feature cache."""

import numpy as np
import pytest
import torch

from prx.eval.features import (
    CLIP_MEAN,
    CLIP_STD,
    FeatureNetMissing,
    clip_preprocess,
    load_feature_net,
)
from prx.eval.inception import FidInceptionV3, resize_bilinear_tf1
from prx.eval.metrics import cached_reference_features, frechet_distance, metric_value, mmd
from prx.hub import PretrainedMissing
from tests.dev_deps import dev_dependency
from tests.tiny_dino import save_tiny_dino

scipy_linalg = dev_dependency("scipy.linalg")
scipy_distance = dev_dependency("scipy.spatial.distance")


def correlated_features(n: int, dim: int, shift: float, seed: int) -> torch.Tensor:
    """(n, dim) float64 samples of a Gaussian with a random full covariance and mean `shift`."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5
    return torch.randn(n, dim, generator=g, dtype=torch.float64) @ mixing + shift


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's formula: scipy.linalg.sqrtm of the (non-symmetric) covariance product."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy_linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


@pytest.mark.parametrize("n, dim", [(400, 24), (123, 77)])
def test_frechet_distance_matches_scipy_sqrtm(n, dim):
    a, b = correlated_features(n, dim, 0.0, 0), correlated_features(n + 5, dim, 0.3, 1)
    expected = scipy_frechet(a.numpy(), b.numpy())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)  # symmetric


def test_frechet_distance_matches_torchmetrics_with_a_custom_feature_module():
    fid_module = dev_dependency("torchmetrics.image.fid")

    class ProjectPixels(torch.nn.Module):
        """uint8 (B, 3, 8, 8) -> (B, 12) float64: a fixed random projection of the pixels."""

        num_features = 12

        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(3)
            self.register_buffer("projection", torch.randn(3 * 8 * 8, 12, generator=g, dtype=torch.float64))

        def forward(self, images):
            return (images.double().flatten(1) / 255.0) @ self.projection

    extractor = ProjectPixels()
    g = torch.Generator().manual_seed(4)
    real = torch.randint(0, 256, (300, 3, 8, 8), generator=g, dtype=torch.uint8)
    fake = torch.randint(40, 200, (250, 3, 8, 8), generator=g, dtype=torch.uint8)
    metric = fid_module.FrechetInceptionDistance(feature=extractor, normalize=False)
    for chunk in real.split(64):
        metric.update(chunk, real=True)
    for chunk in fake.split(64):
        metric.update(chunk, real=False)
    expected = metric.compute()
    assert expected.dtype == torch.float64 and expected > 1.0
    assert frechet_distance(extractor(fake), extractor(real)) == pytest.approx(expected.item(), rel=1e-6)


def test_frechet_distance_is_exact_on_singular_covariances():
    """Commuting covariances Q diag(d) Q^T: FID = ||mu_a - mu_b||^2 + sum (sqrt d_a - sqrt d_b)^2, exactly,
    here with zero eigenvalues (rank-deficient, as N <= D gives)."""
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    d_a = torch.rand(16, generator=g, dtype=torch.float64) * 4
    d_b = torch.rand(16, generator=g, dtype=torch.float64) * 4
    d_a[:5], d_b[3:9] = 0.0, 0.0
    mu_a, mu_b = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    stats_a, stats_b = (mu_a, q @ torch.diag(d_a) @ q.T), (mu_b, q @ torch.diag(d_b) @ q.T)
    expected = (mu_a - mu_b).square().sum() + (d_a.sqrt() - d_b.sqrt()).square().sum()
    assert frechet_distance(stats_a, stats_b) == pytest.approx(expected.item(), rel=1e-9)
    # fewer samples than dimensions: singular covariance, still finite, 0 against itself
    few = correlated_features(10, 32, 0.0, 6)
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-9)
    assert np.isfinite(frechet_distance(few, correlated_features(12, 32, 1.0, 7)))


def cdist_mmd(x: np.ndarray, y: np.ndarray, sigma: float, scale: float) -> float:
    """The biased estimator from pairwise squared distances (scipy), all pairs including diagonals."""
    def kernel_mean(a, b):
        return np.exp(-scipy_distance.cdist(a, b, "sqeuclidean") / (2 * sigma ** 2)).mean()
    return scale * (kernel_mean(x, x) + kernel_mean(y, y) - 2 * kernel_mean(x, y))


@pytest.mark.parametrize("sigma, block_rows", [(10.0, 1024), (3.0, 7)])
def test_mmd_matches_scipy_cdist(sigma, block_rows):
    x, y = correlated_features(300, 32, 0.0, 8) * 4, correlated_features(251, 32, 0.5, 9) * 4
    expected = cdist_mmd(x.numpy(), y.numpy(), sigma, 1000.0)
    assert expected > 1e-3
    assert mmd(x, y, sigma=sigma, block_rows=block_rows) == pytest.approx(expected, rel=1e-9)
    assert mmd(x.float(), y.float(), sigma=sigma) == pytest.approx(cdist_mmd(
        x.float().double().numpy(), y.float().double().numpy(), sigma, 1000.0), rel=1e-9)  # float64 inside


def test_mmd_is_zero_on_the_same_set_and_grows_with_a_shift():
    x = torch.nn.functional.normalize(correlated_features(200, 64, 0.0, 10), dim=-1)  # unit norm, like CLIP
    assert mmd(x, x) == 0.0  # the biased estimator: diagonals included, exactly zero
    direction = torch.nn.functional.normalize(torch.ones(64, dtype=torch.float64), dim=0)
    values = [mmd(x, x + step * direction) for step in (0.1, 0.3, 1.0, 3.0)]
    assert all(v > 0 for v in values) and values == sorted(values)
    with pytest.raises(ValueError, match="non-empty"):
        mmd(x, x[:, :10])


def test_metric_value_dispatches_by_name():
    a, b = correlated_features(50, 8, 0.0, 11), correlated_features(60, 8, 0.2, 12)
    assert metric_value("fid", a, b) == frechet_distance(a, b)
    assert metric_value("cmmd", a, b) == metric_value("dino_mmd", a, b) == mmd(a, b)
    with pytest.raises(ValueError, match="unknown metric"):
        metric_value("kid", a, b)


# ---- feature nets ----------------------------------------------------------------------------------

TINY_CLIP_VISION = dict(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=2, projection_dim=16)


def save_tiny_clip(path, full: bool):
    """A random CLIP: the vision tower with projection alone, or a full CLIPModel (as the hub checkpoint is)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    if full:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    projection_dim=16, vocab_size=99)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_CLIP_VISION, projection_dim=16))
    else:
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION))
    model.eval().save_pretrained(path)
    return model


def uint8_images(count: int, height: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, height, width), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("full", [False, True])
def test_clip_features_are_normalised_image_embeds(tmp_path, full):
    original = save_tiny_clip(tmp_path / "clip", full)
    net = load_feature_net("cmmd", str(tmp_path / "clip"), "cpu")
    images = uint8_images(3, 40, 61, 13)
    features = net(images)
    assert (net.metric, net.dim) == ("cmmd", 16)
    assert features.shape == (3, 16) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(net(images), features, rtol=0, atol=0)  # deterministic
    mean, std = torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1), torch.tensor(CLIP_STD).reshape(1, 3, 1, 1)
    with torch.no_grad():
        pixels = clip_preprocess(images, 28, mean, std)
        if full:  # the full model's own image path: projection of the pooled vision output
            embeds = original.get_image_features(pixel_values=pixels)
            embeds = getattr(embeds, "pooler_output", embeds)  # an output object in transformers 5, a tensor in 4
        else:
            embeds = original(pixel_values=pixels).image_embeds
    torch.testing.assert_close(features, torch.nn.functional.normalize(embeds, dim=-1), rtol=1e-5, atol=1e-6)
    assert net.identity.startswith("clip:") and "/v1" in net.identity


@pytest.mark.parametrize("height, width", [(40, 61), (28, 50), (100, 100), (17, 23), (61, 40)])
def test_clip_preprocess_matches_the_pil_clip_image_processor(height, width):
    try:  # transformers 5: the PIL backend has its own class; 4.x: CLIPImageProcessor is the PIL one
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as PilProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as PilProcessor
    processor = PilProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    images = uint8_images(2, height, width, 14)
    expected = processor(images=list(images.numpy()), return_tensors="pt")["pixel_values"]
    mean, std = torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1), torch.tensor(CLIP_STD).reshape(1, 3, 1, 1)
    levels = ((clip_preprocess(images, 28, mean, std) - expected) * std * 255).abs()  # in uint8 levels
    # PIL's own rounding (fixed-point weights) moves about 0.05% of pixels by one level; beyond that these
    # sizes match it exactly (clip_preprocess's docstring names the portrait sizes that do not)
    assert levels.max() <= 1.0 + 1e-4 and (levels > 0.5).float().mean() < 2e-3


def test_dino_features_are_the_normalised_cls_token(tmp_path):
    original = save_tiny_dino("v2", tmp_path / "dino")
    net = load_feature_net("dino_mmd", str(tmp_path / "dino"), "cpu")
    images = uint8_images(2, 50, 70, 15)
    features = net(images)
    assert (net.metric, net.dim) == ("dino_mmd", 32) and features.shape == (2, 32)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(net(images), features, rtol=0, atol=0)
    # independently: 518 x 518 bicubic, ImageNet-normalised, CLS of the last block through the final LayerNorm
    x = torch.nn.functional.interpolate(images.float() / 255, size=(518, 518), mode="bicubic", align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).reshape(
        1, 3, 1, 1)
    with torch.no_grad():
        cls = original.layernorm(original(pixel_values=x, output_hidden_states=True).hidden_states[-1])[:, 0]
    torch.testing.assert_close(features, torch.nn.functional.normalize(cls, dim=-1), rtol=1e-5, atol=1e-6)
    assert net.identity.startswith("dino:")


def test_inception_features_from_a_state_dict_file(tmp_path):
    torch.manual_seed(0)
    model = FidInceptionV3()
    with torch.no_grad():  # He init keeps the signal alive through 94 random layers (default init fades it)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # as in the real file
    torch.save(state, tmp_path / "inception.pth")
    net = load_feature_net("fid", str(tmp_path / "inception.pth"), "cpu")
    images = uint8_images(2, 64, 80, 16)
    features = net(images)
    assert (net.metric, net.dim) == ("fid", 2048) and features.shape == (2, 2048)
    torch.testing.assert_close(net(images), features, rtol=0, atol=0)
    assert (features[0] - features[1]).abs().max() > 1e-3  # different images, different features
    with torch.no_grad():
        torch.testing.assert_close(features, model.eval()(images))
    assert net.identity.startswith("fid-inception-v3:sha256=")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(FeatureNetMissing, match="not the FID Inception-v3 state dict"):
        load_feature_net("fid", str(tmp_path / "other.pth"), "cpu")


def test_tf1_bilinear_resize_samples_without_half_pixel_centres():
    """TF1 ResizeBilinear(align_corners=False) doubling a row: out[2i] = in[i], out[2i + 1] = the mean
    of in[i] and in[i + 1], the last one repeating the edge (torch's half-pixel bilinear would not)."""
    row = torch.tensor([0.0, 10.0, 40.0, 100.0]).reshape(1, 1, 1, 4)
    out = resize_bilinear_tf1(row.expand(1, 1, 2, 4), (2, 8))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 25.0, 40.0, 70.0, 100.0, 100.0]))
    same = uint8_images(1, 299, 299, 17).float()
    torch.testing.assert_close(resize_bilinear_tf1(same, (299, 299)), same, rtol=0, atol=0)


@pytest.mark.parametrize("metric, option",
                         [("fid", "eval.inception"), ("cmmd", "eval.clip"), ("dino_mmd", "eval.dino")])
def test_a_missing_feature_net_says_how_to_get_it(tmp_path, monkeypatch, metric, option):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache, whatever this machine has
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    source = str(tmp_path / "nowhere.pth") if metric == "fid" else "someone/not-cached"
    with pytest.raises(FeatureNetMissing, match=option.replace(".", r"\.")) as caught:
        load_feature_net(metric, source, "cpu")
    assert isinstance(caught.value, PretrainedMissing)  # train.py catches the base class
    how = "pt_inception-2015-12-05-6726825d.pth" if metric == "fid" else "hf download someone/not-cached"
    assert how in str(caught.value)
    with pytest.raises(ValueError, match="unknown metric"):
        load_feature_net("kid", source, "cpu")


# ---- reference cache -------------------------------------------------------------------------------

def test_reference_features_are_cached_by_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(12, dtype=torch.float32).reshape(3, 4) + len(calls)

    key = {"data": "/data/val", "samples": 3, "resolution": 256, "net": "clip:abc:v1"}
    first = cached_reference_features(tmp_path / "cache", key, compute)
    again = cached_reference_features(tmp_path / "cache", dict(reversed(list(key.items()))), compute)
    assert len(calls) == 1  # same key (in any order): read from disk
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    other = cached_reference_features(tmp_path / "cache", {**key, "samples": 4}, compute)
    assert len(calls) == 2 and not torch.equal(other, first)  # another key: computed, its own file
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 4 and not any(name.endswith(".tmp") for name in files)  # 2 x (.safetensors, .json)
    cached_reference_features(tmp_path / "cache", key, compute)
    assert len(calls) == 2  # the first key's file is still there
