"""Image similarity for generated samples: PSNR and SSIM (pure numpy).

The SegQuant paper's protocol compares each quantized model's images with the full-precision model's
images from the same seed and condition; these are the two numbers it reports next to FID.
"""

from __future__ import annotations

import numpy as np

SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: `10 log10(data_range^2 / mean((x - y)^2))`; inf when identical."""
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
    return float("inf") if mse == 0.0 else 10.0 * np.log10(data_range ** 2 / mse)


def gaussian_window(sigma: float = 1.5, radius: int = 3) -> np.ndarray:
    """A normalised 2-D Gaussian window of side `2 radius + 1`."""
    r = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(r ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g)
    return w / w.sum()


def _filter(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Weighted local means over every full window position ('valid': no padding at the borders)."""
    view = np.lib.stride_tricks.sliding_window_view(img, window.shape, axis=(-2, -1))
    return np.tensordot(view, window, axes=((-2, -1), (0, 1)))


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0, sigma: float = 1.5, radius: int = 3) -> float:
    """Mean structural similarity (Wang et al. 2004) of two images `[..., H, W]`.

    With Gaussian-weighted local statistics (window `gaussian_window(sigma, radius)`, 7x7 by default so
    it fits small images; no sample-covariance correction) at every full window position:
    `SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`,
    `C1 = (0.01 L)^2`, `C2 = (0.03 L)^2`, `L = data_range`; averaged over positions and leading axes.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    window = gaussian_window(sigma, radius)
    if x.ndim < 2 or min(x.shape[-2:]) < window.shape[0]:
        raise ValueError(f"images of shape {x.shape} are smaller than the {window.shape[0]}x{window.shape[0]} window")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _filter(x, window), _filter(y, window)
    var_x = _filter(x * x, window) - mu_x ** 2
    var_y = _filter(y * y, window) - mu_y ** 2
    cov = _filter(x * y, window) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(np.mean(s))
