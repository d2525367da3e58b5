"""How activation maximization parameterizes an image: as its pixels, or as a Fourier spectrum.

"fft" (Olah et al. 2017, "Feature Visualization", as Lucid's `image.fft_image`): the variables
are the real and imaginary parts of the image's 2-D real FFT, each frequency scaled by 1/f (so
an even start is pink noise, the spectrum of natural images, and gradient steps favour low
frequencies); for RGB the three channels are mixed by the square root of ImageNet's colour
correlation (`decorrelate`); a sigmoid maps the result into [0, 1]. "pixel": the image in
[0, 1] itself, clipped after each step.
"""

from __future__ import annotations

import numpy as np

PARAMETERIZATIONS = ("pixel", "fft")

# Lucid's square root of ImageNet's RGB covariance (`color_correlation_svd_sqrt`), each column
# scaled so the largest has norm 1.
_COLOUR_CORRELATION = np.asarray([[0.26, 0.09, 0.02],
                                  [0.27, 0.00, -0.05],
                                  [0.27, -0.09, 0.03]], np.float32)
_COLOUR_CORRELATION /= np.max(np.linalg.norm(_COLOUR_CORRELATION, axis=0))


def default_parameterization(input_shape: tuple[int, int, int]) -> str:
    """The parameterization used when none is asked for: "pixel", whatever `input_shape`
    (H, W, C).

    The default is the one whose class images transfer best (issue 21): on 64x64 RGB shapes,
    an independently trained model assigned 46% of pixel ascent's class images to their class
    and 40% of fft's (bench/feature_vis.py, 8 model pairs, 160 images each; a gap within noise,
    and nothing measured favours fft). Until "fft" wins a measurement somewhere, it is asked
    for by name; a size-dependent rule would go here.
    """
    return "pixel"


def spectrum_scale(height: int, width: int, decay_power: float = 1.0) -> np.ndarray:
    """(height, width // 2 + 1) float32: 1 / max(f, 1 / max side) ** decay_power times
    sqrt(height * width), f the frequency in cycles per pixel of each rfft2 coefficient."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    frequencies = np.sqrt(fx * fx + fy * fy)
    scale = 1.0 / np.maximum(frequencies, 1.0 / max(height, width)) ** decay_power
    return (scale * np.sqrt(height * width)).astype(np.float32)


def start_spectrum(rng: np.random.Generator, input_shape: tuple[int, int, int],
                   sd: float = 0.01) -> np.ndarray:
    """The starting variables (2, C, H, W // 2 + 1): N(0, sd^2) real and imaginary parts."""
    height, width, channels = input_shape
    return (sd * rng.standard_normal((2, channels, height, width // 2 + 1))).astype(np.float32)


def fft_images(spectra, input_shape: tuple[int, int, int]):
    """Images (N, H, W, C) in [0, 1] from spectrum variables (N, 2, C, H, W // 2 + 1);
    `keras.ops`, differentiable on every backend."""
    from keras import ops

    height, width, channels = input_shape
    scale = ops.convert_to_tensor(spectrum_scale(height, width))
    planes = _inverse_rfft2(spectra[:, 0] * scale, spectra[:, 1] * scale, height, width)
    images = ops.transpose(planes, (0, 2, 3, 1)) / 4.0  # Lucid's /4: a start near mid-grey
    if channels == 3:
        images = ops.einsum("nhwc,dc->nhwd", images, ops.convert_to_tensor(_COLOUR_CORRELATION))
    return ops.sigmoid(images)


def _inverse_rfft2(real, imaginary, height: int, width: int):
    """numpy's irfft2 over the last two axes of (..., H, W // 2 + 1) coefficients given as real
    and imaginary parts: the inverse FFT along H (the conjugate of the FFT of the conjugate,
    over H), then the inverse real FFT along W."""
    from keras import ops

    last = ops.ndim(real) - 1
    order = (*range(last - 1), last, last - 1)  # H last, for the 1-D FFT
    forward_real, forward_imaginary = ops.fft(
        (ops.transpose(real, order), -ops.transpose(imaginary, order)))
    real = ops.transpose(forward_real, order) / height
    imaginary = -ops.transpose(forward_imaginary, order) / height
    return ops.irfft((real, imaginary), fft_length=width)
