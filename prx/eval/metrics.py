"""The arithmetic of the quality metrics: Fréchet distance (FID), kernel MMD (CMMD, DINO-MMD), and the
on-disk cache of the real images' features.

All in float64 on the features' device. 10k x 2048 Inception features: two covariances of 32 MiB
and three 2048 x 2048 eigendecompositions; 10k x 1024 MMD: 3 x 10^8 kernel entries, taken in row
blocks of 1024 (80 MiB each) so no 10k x 10k matrix (800 MiB) is ever held.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from prx.eval.features import METRIC_NAMES

MMD_SIGMA = 10.0  # CMMD's _SIGMA (google-research/cmmd/distance.py)
MMD_SCALE = 1000.0  # CMMD's _SCALE: the value reads in units of 1e-3
MMD_BLOCK_ROWS = 1024


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) -> (mean (D,), covariance (D, D)) in float64, the covariance with N - 1 (np.cov's default,
    which pytorch-fid, torch-fidelity and torchmetrics use)."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got {tuple(features.shape)}")
    x = features.double()
    return x.mean(dim=0), torch.atleast_2d(torch.cov(x.T))  # D = 1: cov is 0-d


def psd_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh of a symmetric PSD matrix with its rounding-level eigenvalues set to 0: those below
    D * eps * the largest (numpy's matrix_rank tolerance). A rank-deficient covariance (N <= D) has
    eigenvalues of +-1e-16 x its scale instead of 0, whose square roots (1e-8) would add up to a
    1e-7 relative error in the trace of the root; clamping only the negative ones halves that."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    tolerance = eigenvalues.abs().max() * matrix.shape[0] * torch.finfo(matrix.dtype).eps
    return torch.where(eigenvalues > tolerance, eigenvalues, 0.0), eigenvectors


def symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The PSD square root of a symmetric PSD matrix."""
    eigenvalues, eigenvectors = psd_eigh(matrix)
    return (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.T


def frechet_distance(a: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                     b: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2) between two feature sets (N, D), or
    their precomputed (mean, covariance).

    tr((S_a S_b)^1/2) is taken as tr((S_a^1/2 S_b S_a^1/2)^1/2): the two matrices are similar, and the
    second is symmetric PSD, so both roots come from eigh with rounding-level eigenvalues set to 0
    (`psd_eigh`). That is stable
    where scipy.linalg.sqrtm of the non-symmetric product needs pytorch-fid's eps * I offset (singular
    covariances when N <= D, e.g. 1k samples of 2048-d Inception features).
    """
    mean_a, cov_a = a if isinstance(a, tuple) else gaussian_stats(a)
    mean_b, cov_b = b if isinstance(b, tuple) else gaussian_stats(b)
    mean_a, cov_a, mean_b, cov_b = (t.double() for t in (mean_a, cov_a, mean_b, cov_b))
    root_a = symmetric_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.T) / 2  # symmetric up to rounding; eigh reads one triangle
    trace_root = psd_eigh(middle)[0].sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    return float(distance)


def rbf_kernel_mean(x: torch.Tensor, y: torch.Tensor, gamma: float, block_rows: int) -> torch.Tensor:
    """mean over all (i, j) of exp(-gamma ||x_i - y_j||^2), x in row blocks; float64 0-d tensor."""
    y_sqnorms = y.square().sum(dim=1)
    total = x.new_zeros((), dtype=torch.float64)
    for start in range(0, x.shape[0], block_rows):
        block = x[start:start + block_rows]
        sqdist = block.square().sum(dim=1, keepdim=True) + y_sqnorms - 2 * block @ y.T
        total += torch.exp(-gamma * sqdist.clamp(min=0)).sum()  # clamp: rounding can give -1e-14
    return total / (x.shape[0] * y.shape[0])


def mmd(x: torch.Tensor, y: torch.Tensor, sigma: float = MMD_SIGMA, scale: float = MMD_SCALE,
        block_rows: int = MMD_BLOCK_ROWS) -> float:
    """scale * MMD^2 between feature sets x (N, D) and y (M, D), Gaussian RBF kernel
    k(a, b) = exp(-||a - b||^2 / (2 sigma^2)), the biased (V-statistic) estimator:
    mean k(x, x') + mean k(y, y') - 2 mean k(x, y), each mean over all pairs, diagonals included.

    This is CMMD's estimator (Jayasumana et al., "Rethinking FID: Towards a Better Evaluation Metric
    for Image Generation", CVPR 2024, arXiv 2401.09603): the official google-research/cmmd/distance.py
    implements "the minimum-variance/biased version of the estimator described in Eq. (5) of Gretton
    et al., JMLR 2012" with sigma = 10, scale = 1000, and the Photoroom PRX reference's CMMD and
    DINO-MMD use the same. Biased means mmd(x, x) = 0 exactly and the value is >= 0; it exceeds the
    unbiased estimate by scale * ((1 - mean_{i != j} k(x_i, x_j)) / N + (1 - mean_{i != j} k(y_i, y_j)) / M):
    at most 0.2 for 10k images each, about 0.002 for unit-norm embeddings at sigma 10 (there every
    k >= exp(-4 / 200) = 0.98).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise ValueError(f"need non-empty (N, D) and (M, D) features, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.to(x.device, torch.float64)
    gamma = 1.0 / (2.0 * sigma * sigma)
    k_xx = rbf_kernel_mean(x, x, gamma, block_rows)
    k_yy = rbf_kernel_mean(y, y, gamma, block_rows)
    k_xy = rbf_kernel_mean(x, y, gamma, block_rows)
    return float(scale * (k_xx + k_yy - 2 * k_xy))


def metric_value(metric: str, generated: torch.Tensor, reference: torch.Tensor) -> float:
    """The metric named `metric` between generated and reference features (lower is better for all three)."""
    if metric == "fid":
        return frechet_distance(generated, reference)
    if metric in ("cmmd", "dino_mmd"):
        return mmd(generated, reference)
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRIC_NAMES}")


def reference_cache_paths(cache_dir: Path, key: dict) -> tuple[Path, Path, str]:
    """(features file, key file, canonical key JSON): the file name is a hash of the key, so each key
    has its own file and an old one is never overwritten by a different key."""
    key_json = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(key_json.encode()).hexdigest()[:16]
    return cache_dir / f"reference-{digest}.safetensors", cache_dir / f"reference-{digest}.json", key_json


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename over `path`: a reader sees the old file or the whole new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cached_reference_features(cache_dir: Path, key: dict, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The real images' features for `key` (a JSON-able dict: data path, sample count, resolution,
    feature net identity, ...): loaded from `cache_dir` if computed before with the same key, else
    compute() (N, D), saved as safetensors and returned (on the CPU, fp32 as computed).

    The key is stored in the safetensors metadata, which decides a hit, and beside it as JSON for
    people to read; a hash collision or a file from another key is recomputed, not trusted.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    cache_dir = Path(cache_dir)
    features_path, key_path, key_json = reference_cache_paths(cache_dir, key)
    if features_path.exists():
        with safe_open(str(features_path), framework="pt") as f:
            if (f.metadata() or {}).get("key") == key_json:
                return f.get_tensor("features")
    features = compute().detach().cpu().contiguous()
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(features_path, lambda tmp: save_file({"features": features}, str(tmp), metadata={"key": key_json}))
    write_atomic(key_path, lambda tmp: tmp.write_text(json.dumps(key, sort_keys=True, indent=2) + "\n"))
    return features
