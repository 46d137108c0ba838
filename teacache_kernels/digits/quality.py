"""How good the embedded model's samples are: a digit classifier, PSNR and SSIM.

The classifier (an SVM, 99% accurate on the real digits) answers "are the samples recognisable":
the fraction of samples it labels as the digit they were conditioned on. It needs scikit-learn
(the `train` extra); PSNR and SSIM are plain torch.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def to_dataset_scale(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the dataset's 0-16 gray levels."""
    return (images.float().clamp(-1, 1) + 1) * 8


@functools.lru_cache(maxsize=1)
def _classifier():
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(gamma=0.001, C=10.0).fit(digits.data, digits.target)


def classify(images: torch.Tensor) -> torch.Tensor:
    """Predicted digit per [-1, 1] image of shape [B, 8, 8]."""
    flat = to_dataset_scale(images).reshape(len(images), -1).cpu().numpy()  # host-ok: sklearn
    return torch.as_tensor(_classifier().predict(flat))


def digit_accuracy(images: torch.Tensor, labels) -> float:
    """Fraction of samples the classifier recognises as their conditioning digit."""
    labels = torch.as_tensor(labels).cpu()  # host-ok: scoring, off the step path
    return float((classify(images) == labels).float().mean())


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for [-1, 1] images (peak-to-peak range 2); inf where identical."""
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse)


def ssim(images: torch.Tensor, reference: torch.Tensor, *, window: int = 3) -> torch.Tensor:
    """Per-image SSIM of [-1, 1] images [B, H, W] (Wang et al. 2004, uniform `window`, valid region).

    The same definition as scikit-image's `structural_similarity(win_size=3, data_range=2)` (uniform
    window, sample covariance, border of half a window left out); the tests check the two agree.
    A 3x3 window because the images are 8x8: the usual 7x7 would leave a 2x2 region to compare.
    """
    x = images.double()[:, None]
    y = reference.double()[:, None]
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    n = window * window
    mean = functools.partial(F.avg_pool2d, kernel_size=window, stride=1)
    mx, my = mean(x), mean(y)
    cov_norm = n / (n - 1)  # sample covariance, as scikit-image
    vx = cov_norm * (mean(x * x) - mx * mx)
    vy = cov_norm * (mean(y * y) - my * my)
    vxy = cov_norm * (mean(x * y) - mx * my)
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)
