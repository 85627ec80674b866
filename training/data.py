"""Unpaired training data: two image folders (clean, rainy), random crops and horizontal flips.

- Images are **preloaded** into memory as uint8 (the datasets here are ~200 images), so the
  two CPU cores go to compute, not decoding.
- Unreadable files are skipped with one ``UserWarning`` each (runtime.io.load_rgb raises
  ImageError); a folder with no readable image raises InputError.
- Images whose shorter side is below the crop size are **upscaled** (bicubic, aspect ratio
  kept) at load time so the shorter side equals the crop: every crop is then a real crop of
  the whole scene rather than a padded one (padding would teach the model border artefacts).
- Sampling is unpaired: clean and rainy images are drawn independently, each domain walking
  through its own shuffled permutation (a new one every epoch). Everything comes from one
  numpy PCG64 generator seeded by (seed, rank), and :meth:`UnpairedSampler.state_dict` holds
  the generator state and the positions, so a resumed run continues with the same data order.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from runtime.errors import ImageError, InputError
from runtime.io import iter_image_files, load_rgb

__all__ = ["load_folder", "load_folders", "UnpairedSampler", "random_crop_flip"]


def _fit_min_side(img: np.ndarray, min_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    if min(h, w) >= min_side:
        return img
    s = min_side / min(h, w)
    size = (max(min_side, round(w * s)), max(min_side, round(h * s)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC))


def load_folder(folder: str | os.PathLike, *, min_side: int = 0) -> tuple[list[np.ndarray], list[Path]]:
    """Every readable image of ``folder`` as HxWx3 uint8 (upscaled to ``min_side``), and its path."""
    images, paths = [], []
    for p in iter_image_files(folder):
        try:
            img = load_rgb(p)
        except ImageError as e:
            warnings.warn(f"skipping unreadable image {e}", UserWarning, stacklevel=2)
            continue
        images.append(_fit_min_side(img, min_side))
        paths.append(p)
    if not images:
        raise InputError(f"{folder}: no readable images (suffixes .png .jpg .jpeg .bmp .tif .webp ...)")
    return images, paths


def load_folders(folders: str | os.PathLike | list, *, min_side: int = 0) -> tuple[list[np.ndarray], list[Path]]:
    """:func:`load_folder` over one folder or several (``rd-train fit --clean A --clean B``), in order.

    A folder with no readable image is an error even when the others have some: a typo in one
    path must not silently shrink the training set.
    """
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    images: list[np.ndarray] = []
    paths: list[Path] = []
    for folder in folders:
        imgs, ps = load_folder(folder, min_side=min_side)
        images += imgs
        paths += ps
    if not folders:
        raise InputError("no image folder given")
    return images, paths


def random_crop_flip(img: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop x crop window, flipped left-right with probability 1/2."""
    h, w = img.shape[:2]
    top = int(rng.integers(0, h - crop + 1))
    left = int(rng.integers(0, w - crop + 1))
    out = img[top:top + crop, left:left + crop]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out


@dataclass
class _Domain:
    images: list[np.ndarray]
    perm: np.ndarray | None = None
    pos: int = 0

    def next_index(self, rng: np.random.Generator) -> int:
        if self.perm is None or self.pos >= len(self.perm):
            self.perm = rng.permutation(len(self.images))
            self.pos = 0
        i = int(self.perm[self.pos])
        self.pos += 1
        return i


class UnpairedSampler:
    """Endless unpaired batches (x clean, y rainy), float32 [B, 3, crop, crop] in [-1, 1]."""

    def __init__(self, clean: list[np.ndarray], rainy: list[np.ndarray], *, batch: int, crop: int, seed: int,
                 rank: int = 0) -> None:
        self.batch, self.crop = batch, crop
        self.clean = _Domain([_fit_min_side(im, crop) for im in clean])
        self.rainy = _Domain([_fit_min_side(im, crop) for im in rainy])
        # Distinct stream per rank (each rank its own data shard in DDP).
        self.rng = np.random.Generator(np.random.PCG64([int(seed), int(rank), 0xDA7A]))
        self.position = 0  # batches drawn so far

    def _draw(self, dom: _Domain) -> torch.Tensor:
        crops = [random_crop_flip(dom.images[dom.next_index(self.rng)], self.crop, self.rng) for _ in range(self.batch)]
        arr = np.stack(crops).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(arr)).float() / 127.5 - 1.0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._draw(self.clean)
        y = self._draw(self.rainy)
        self.position += 1
        return x, y

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """Plain data only (weights_only-loadable): generator state, permutations, positions."""
        st = self.rng.bit_generator.state
        return {
            "bit_generator": {"state": int(st["state"]["state"]), "inc": int(st["state"]["inc"]),
                              "has_uint32": int(st["has_uint32"]), "uinteger": int(st["uinteger"])},
            "clean": {"perm": None if self.clean.perm is None else self.clean.perm.tolist(), "pos": self.clean.pos},
            "rainy": {"perm": None if self.rainy.perm is None else self.rainy.perm.tolist(), "pos": self.rainy.pos},
            "position": self.position,
        }

    def load_state_dict(self, d: dict) -> None:
        bg = d["bit_generator"]
        self.rng.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": bg["state"], "inc": bg["inc"]},
                                        "has_uint32": bg["has_uint32"], "uinteger": bg["uinteger"]}
        for name in ("clean", "rainy"):
            dom: _Domain = getattr(self, name)
            perm = d[name]["perm"]
            dom.perm = None if perm is None else np.asarray(perm, dtype=np.int64)
            dom.pos = int(d[name]["pos"])
            if dom.perm is not None and (len(dom.perm) != len(dom.images)):
                warnings.warn(f"the {name} folder changed since the checkpoint ({len(dom.perm)} -> "
                              f"{len(dom.images)} images); starting a new epoch", UserWarning, stacklevel=2)
                dom.perm, dom.pos = None, 0
        self.position = int(d["position"])
