"""Training-time photometric augmentation of prepared (normalised) pixel batches.

Pre-training data of real CLIP models is varied in exactly the ways a clean procedural domain is not:
grey-scale scans, low contrast, sensor noise, uneven illumination, blur. `PhotometricAugment` draws
those per image, in pixel space ([0, 1] after undoing the backbone's normalisation), from the global
torch RNG, so a run with a seed is reproducible and a resumed run (whose checkpoint holds the RNG
state) draws the same augmentations as an uninterrupted one.

Options (a task's `augment:` mapping; `augment: true` takes every default):
- `grayscale` (0.25): probability that an image is turned to its luminance;
- `contrast` ([0.35, 1.0]): contrast factor range about the image mean;
- `brightness` (0.1): shift range (+/-) of the image mean;
- `illumination` (0.12): amplitude range of a smooth random light field (4x4 noise, bilinear);
- `noise` (0.1): range of the standard deviation of per-pixel Gaussian noise;
- `blur` (0.3): probability of a 3x3 Gaussian blur;
- `p` (0.8): probability that an image is augmented at all.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError


@dataclass
class PhotometricAugment:
    grayscale: float = 0.25
    contrast: tuple[float, float] = (0.35, 1.0)
    brightness: float = 0.1
    illumination: float = 0.12
    noise: float = 0.1
    blur: float = 0.3
    p: float = 0.8

    @classmethod
    def from_option(cls, value: Any) -> PhotometricAugment | None:
        """None for a false/absent option, the defaults for `true`, else the mapping's values."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, dict):
            raise ConfigError(f"augment must be true, false or a mapping of options, got {value!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"unknown augment option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        kw = dict(value)
        if "contrast" in kw:
            c = kw["contrast"]
            if not (isinstance(c, (list, tuple)) and len(c) == 2):
                raise ConfigError(f"augment.contrast must be [low, high], got {c!r}")
            kw["contrast"] = (float(c[0]), float(c[1]))
        kwargs: dict[str, Any] = {k: (v if k == "contrast" else float(v)) for k, v in kw.items()}
        out = cls(**kwargs)
        out.validate()
        return out

    def validate(self) -> None:
        for name in ("grayscale", "blur", "p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"augment.{name} is a probability in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "illumination", "noise"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        lo, hi = self.contrast
        if not 0.0 < lo <= hi:
            raise ConfigError(f"augment.contrast must satisfy 0 < low <= high, got {list(self.contrast)}")

    def __call__(self, pixels: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented pixels, bool mask of the images turned grey) for a normalised (N, 3, H, W) batch."""
        n = pixels.shape[0]
        dev, dt = pixels.device, pixels.dtype
        m = torch.as_tensor(mean, dtype=dt, device=dev).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=dt, device=dev).view(1, -1, 1, 1)

        def u(*shape):
            return torch.rand(*shape).to(device=dev, dtype=dt)

        raw = pixels * s + m
        on = u(n) < self.p
        grey = on & (u(n) < self.grayscale)
        lum = (0.299 * raw[:, 0:1] + 0.587 * raw[:, 1:2] + 0.114 * raw[:, 2:3]).expand_as(raw)
        out = torch.where(grey.view(-1, 1, 1, 1), lum, raw)
        lo, hi = self.contrast
        c = (lo + (hi - lo) * u(n)).view(-1, 1, 1, 1)
        mu = out.mean(dim=(1, 2, 3), keepdim=True)
        out = mu + c * (out - mu)
        out = out + (self.brightness * (2 * u(n) - 1)).view(-1, 1, 1, 1)
        if self.illumination > 0:
            field = torch.randn(n, 1, 4, 4).to(device=dev, dtype=dt)
            field = F.interpolate(field, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
            out = out + (self.illumination * u(n)).view(-1, 1, 1, 1) * field
        if self.noise > 0:
            out = out + (self.noise * u(n)).view(-1, 1, 1, 1) * torch.randn(pixels.shape).to(device=dev, dtype=dt)
        if self.blur > 0:
            k = torch.tensor([1.0, 2.0, 1.0], dtype=dt, device=dev)
            k = (k[:, None] * k[None, :]) / 16.0
            blurred = F.conv2d(
                F.pad(out, (1, 1, 1, 1), mode="replicate"), k.expand(out.shape[1], 1, 3, 3), groups=out.shape[1]
            )
            out = torch.where((u(n) < self.blur).view(-1, 1, 1, 1), blurred, out)
        out = out.clamp(0.0, 1.0)
        out = torch.where(on.view(-1, 1, 1, 1), out, raw)
        return (out - m) / s, grey
