"""Image sources for the training tasks and the dataset that turns them into affine pairs.

- ``ImageFolder``: any folder of images (affine copying without poses; the "pose" is the image's
  2-channel coordinate map).
- ``DeepFashion``: the DeepFashion pose-transfer file format used by the pose-morphing
  experiments of Grid Partitioned Attention (Jetchev et al. 2021, arXiv 2107.03742) and the
  pose-transfer work before it: an annotation file ``name:keypoints_y:keypoints_x`` (18
  OpenPose keypoints per image, y and x stored separately, -1 for missing), an optional pairs
  file ``from,to`` and a folder of images (256 x 176 in the published files).
- ``AffineCopyDataset``: item i of a fixed, reproducible set of affine pairs from any source.
- ``PosePairDataset``: item i of a fixed set of pose-morphing pairs (one appearance, two poses).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from attnbench.data.affine import WARP_NOISE, affine_pair, coordinate_map
from attnbench.data.mannequin import Mannequin, derive_seed, single_thread
from attnbench.data.pose import MISSING, NUM_KEYPOINTS, default_sigma, heatmaps, limb_flow

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FITS = ("stretch", "pad")
ANNOTATION_HEADER = ["name", "keypoints_y", "keypoints_x"]
PAIRS_HEADER = ["from", "to"]
_AFFINE_ITEM = 4  # tag that separates an item's theta seed from the mannequin's seeds
_POSE_ITEM = 5  # likewise for the self-supervision warp of a pose pair


def load_image(path: str | Path) -> torch.Tensor:
    """[3, h, w] uint8 RGB from any format PIL reads."""
    with Image.open(path) as img:
        return TF.pil_to_tensor(img.convert("RGB"))


def fit_image(
    image: torch.Tensor, size: tuple[int, int], fit: str = "stretch", pad_value: float = 1.0
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Resize a uint8 [3, h, w] image to float32 [3, H, W] in [0, 1] (bilinear, antialiased).

    ``fit="stretch"`` resizes to ``size``; ``fit="pad"`` keeps the aspect ratio and pads the
    short side with ``pad_value`` on both sides (centred).

    Returns:
        The image and the placement of the picture on the canvas: (top, left, height, width).
    """
    if fit not in FITS:
        raise ValueError(f"fit={fit!r} (allowed: {', '.join(FITS)})")
    h, w = image.shape[-2:]
    out_h, out_w = size
    if fit == "stretch":
        inner = (out_h, out_w)
    else:
        scale = min(out_h / h, out_w / w)
        inner = (min(out_h, max(1, round(h * scale))), min(out_w, max(1, round(w * scale))))
    picture = image.float() / 255
    if inner != (h, w):
        picture = TF.resize(picture, list(inner), antialias=True).clamp_(0, 1)
    if inner == (out_h, out_w):
        return picture, (0, 0, out_h, out_w)
    top, left = (out_h - inner[0]) // 2, (out_w - inner[1]) // 2
    canvas = torch.full((3, out_h, out_w), float(pad_value))
    canvas[:, top : top + inner[0], left : left + inner[1]] = picture
    return canvas, (top, left, *inner)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size={size} (must be (H, W) with positive sides)")
    return int(size[0]), int(size[1])


class ImageFolder(Dataset):
    """Every image under ``root`` (recursive, sorted by path), resized to ``size`` = (H, W).

    No poses: ``sample(i)`` gives ``keypoints=None`` and as ``heatmaps`` the 2-channel
    normalised coordinate map, so that a warped copy of it tells where each pixel came from.
    """

    pose_channels = 2

    def __init__(
        self,
        root: str | Path,
        size: tuple[int, int],
        fit: str = "stretch",
        pad_value: float = 1.0,
    ) -> None:
        self.root = Path(root)
        self.size = _check_size(size)
        if fit not in FITS:
            raise ValueError(f"fit={fit!r} (allowed: {', '.join(FITS)})")
        self.fit, self.pad_value = fit, pad_value
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a folder")
        self.files = sorted(
            (
                p
                for p in self.root.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            ),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not self.files:
            raise ValueError(
                f"no images in {self.root} (searched recursively for the extensions "
                f"{', '.join(IMAGE_EXTENSIONS)}, any case)"
            )
        self._coords = coordinate_map(self.size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        return self.sample(index)

    def sample(self, index: int) -> dict:
        """``image`` [3, H, W], ``keypoints`` None, ``heatmaps`` the coordinate map [2, H, W]."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.root}")
        image, _ = fit_image(load_image(self.files[index]), self.size, self.fit, self.pad_value)
        return {"image": image, "keypoints": None, "heatmaps": self._coords.clone()}


def _parse_values(text: str, field: str, where: str) -> list[float]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(
            f"{where}: {field} is not a list of numbers: {text.strip()[:60]!r}"
        ) from None
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"{where}: {field} is not a list of numbers: {text.strip()[:60]!r}")
    if len(values) != NUM_KEYPOINTS:
        raise ValueError(f"{where}: {field} has {len(values)} values (expected {NUM_KEYPOINTS})")
    return [float(v) for v in values]


def read_annotations(path: str | Path, root: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Read a DeepFashion pose annotation file into {name: keypoints [18, 2] (x, y)}.

    The file has the header ``name:keypoints_y:keypoints_x`` and one line per image, e.g.
    ``img.jpg: [25, 50, ...]: [83, 83, ...]`` with 18 values each; a keypoint with a negative
    value is missing and becomes (-1, -1). With ``root``, every name must be a file under it.

    Raises:
        ValueError: naming the file, the line and what is wrong.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    header = [f.strip() for f in lines[0].split(":")] if lines else []
    if header != ANNOTATION_HEADER:
        raise ValueError(
            f"{path}, line 1: header must be {':'.join(ANNOTATION_HEADER)!r}, "
            f"got {lines[0][:80] if lines else ''!r}"
        )
    out: dict[str, torch.Tensor] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        fields = line.split(":")
        if len(fields) != 3:
            raise ValueError(
                f"{where}: expected 3 fields name:keypoints_y:keypoints_x, got {len(fields)}"
            )
        name = fields[0].strip()
        if not name:
            raise ValueError(f"{where}: empty image name")
        if name in first_line:
            raise ValueError(
                f"{where}: duplicate image {name!r} (first on line {first_line[name]})"
            )
        if root is not None and not (Path(root) / name).is_file():
            raise ValueError(f"{where}: unknown image {name!r} (no such file in {root})")
        ys = _parse_values(fields[1], "keypoints_y", where)
        xs = _parse_values(fields[2], "keypoints_x", where)
        kp = torch.tensor([xs, ys], dtype=torch.float32).T  # (18, 2) as (x, y)
        kp[(kp < 0).any(dim=1)] = MISSING
        out[name] = kp
        first_line[name] = lineno
    return out


def read_pairs(path: str | Path, names: set[str] | dict | None = None) -> list[tuple[str, str]]:
    """Read a pairs file (header ``from,to``) into a list of (from, to) image names.

    Raises:
        ValueError: naming the file, the line and what is wrong (a bad header, a row without
            two names, a name not in ``names`` when given).
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    header = [c.strip() for c in rows[0]] if rows else []
    if header != PAIRS_HEADER:
        raise ValueError(f"{path}, line 1: header must be 'from,to', got {','.join(header)!r}")
    pairs = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        cells = [c.strip() for c in row]
        if len(cells) != 2 or not all(cells):
            raise ValueError(f"{path}, line {lineno}: expected two names 'from,to', got {row}")
        for name in cells:
            if names is not None and name not in names:
                raise ValueError(f"{path}, line {lineno}: unknown image {name!r} (not annotated)")
        pairs.append((cells[0], cells[1]))
    return pairs


class DeepFashion(Dataset):
    """The DeepFashion pose-transfer format: images, 18 keypoints each, and pairs.

    Args:
        root: folder holding the images (``root / name``).
        annotations_csv: ``name:keypoints_y:keypoints_x`` file (see ``read_annotations``).
        pairs_csv: optional ``from,to`` file.
        size: output (H, W); keypoints are moved with the resize.
        sigma: heatmap sigma in pixels; default min(H, W) / 40.
        fit: "stretch" (resize to size) or "pad" (keep the aspect ratio, pad; the GPA paper
            pads 256 x 176 to 256 x 256).
        pad_value: colour of the padding (DeepFashion backgrounds are mostly white).
        keypoint_size: (H, W) of the pixel space the annotations are in; default each image's
            own size.
    """

    pose_channels = NUM_KEYPOINTS

    def __init__(
        self,
        root: str | Path,
        annotations_csv: str | Path,
        pairs_csv: str | Path | None = None,
        size: tuple[int, int] = (256, 176),
        sigma: float | None = None,
        fit: str = "stretch",
        pad_value: float = 1.0,
        keypoint_size: tuple[int, int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.size = _check_size(size)
        self.sigma = default_sigma(self.size) if sigma is None else float(sigma)
        if not self.sigma > 0:
            raise ValueError(f"sigma={sigma} (must be > 0)")
        if fit not in FITS:
            raise ValueError(f"fit={fit!r} (allowed: {', '.join(FITS)})")
        self.fit, self.pad_value, self.keypoint_size = fit, pad_value, keypoint_size
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a folder")
        self.keypoints = read_annotations(annotations_csv, self.root)
        self.names = list(self.keypoints)
        self._pairs = [] if pairs_csv is None else read_pairs(pairs_csv, self.keypoints)
        self._has_pairs = pairs_csv is not None

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        return self.sample(index)

    def sample(self, index: int) -> dict:
        """``image`` [3, H, W], ``keypoints`` [18, 2] (x, y), ``heatmaps`` [18, H, W], ``name``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} annotated images")
        return self.load(self.names[index])

    def load(self, name: str) -> dict:
        """The sample of the image called ``name``."""
        raw = load_image(self.root / name)
        image, (top, left, inner_h, inner_w) = fit_image(raw, self.size, self.fit, self.pad_value)
        kp_h, kp_w = self.keypoint_size or tuple(raw.shape[-2:])
        kp = self.keypoints[name]
        # Pixel centres: x + 0.5 is the position in pixel widths, scaled to the placed picture.
        moved = torch.stack(
            [
                (kp[:, 0] + 0.5) * inner_w / kp_w - 0.5 + left,
                (kp[:, 1] + 0.5) * inner_h / kp_h - 0.5 + top,
            ],
            dim=1,
        )
        keypoints = torch.where((kp < 0).any(dim=1, keepdim=True), kp, moved)
        return {
            "image": image,
            "keypoints": keypoints,
            "heatmaps": heatmaps(keypoints, self.size, self.sigma),
            "name": name,
        }

    def pairs(self) -> list[tuple[str, str]]:
        """The (from, to) image names of the pairs file (empty without one)."""
        return list(self._pairs)

    def pair(self, index: int) -> tuple[dict, dict]:
        """The two samples of pair ``index``."""
        if not self._has_pairs:
            raise ValueError("DeepFashion.pair needs pairs_csv (none was given)")
        source, target = self._pairs[index]
        return self.load(source), self.load(target)


class PairSet(Dataset):
    """What the pair datasets share: ``length`` items from ``source`` under ``seed``, with
    heatmaps of ``sigma`` and the self-supervision warp theta = identity + U(-noise, noise);
    ``coords`` adds 2 coordinate channels to the poses (``pose_channels``)."""

    def __init__(self, source, length: int, seed: int, sigma: float, noise: float, coords: bool):
        if length < 1:
            raise ValueError(f"length={length} (must be >= 1)")
        if not sigma > 0:
            raise ValueError(f"sigma={sigma} (must be > 0)")
        self.source, self.length, self.seed = source, int(length), int(seed)
        self.sigma, self.noise, self.coords = float(sigma), float(noise), bool(coords)
        self.pose_channels = source.pose_channels + (2 if self.coords else 0)
        self.size = source.size

    def __len__(self) -> int:
        return self.length

    def generator(self, index: int, tag: int) -> torch.Generator:
        """Item ``index``'s own generator (raising IndexError outside the set)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return torch.Generator().manual_seed(derive_seed(self.seed, index, tag))


class AffineCopyDataset(PairSet):
    """A fixed set of ``length`` affine pairs (``affine_pair``) from a source of images.

    Item i takes image i of the source (a ``Mannequin``: ``sample(seed, i)``; an ``ImageFolder``
    or ``DeepFashion``: ``sample(i % len(source))``) and warps it with a theta drawn from its own
    generator seeded by (seed, i): the same (seed, i) gives the same item in any order, in any
    worker. Use another seed for a held-out set (with folder sources, also other images).
    Items hold tensors only: ``target_keypoints`` is left out when the source has no keypoints.

    Args:
        source: a Mannequin, ImageFolder or DeepFashion.
        length: number of items.
        seed: the set's seed.
        sigma: heatmap sigma in pixels for both poses.
        noise: theta = identity + U(-noise, noise).
        coords: a source with keypoints also gets coordinate maps in both poses
            (``affine_pair``): 2 more pose channels.
    """

    def __init__(
        self,
        source: Mannequin | ImageFolder | DeepFashion,
        length: int,
        seed: int,
        sigma: float,
        noise: float = WARP_NOISE,
        coords: bool = False,
    ) -> None:
        coords = bool(coords) and source.pose_channels != 2  # 2: a coordinate map already
        super().__init__(source, length, seed, sigma, noise, coords)

    def __getitem__(self, index: int) -> dict:
        generator = self.generator(index, _AFFINE_ITEM)
        with single_thread():  # small tensors: threads cost more than they give
            if isinstance(self.source, Mannequin):
                sample = self.source.sample(self.seed, index)
            else:
                sample = self.source.sample(index % len(self.source))
            pair = affine_pair(sample, generator, self.sigma, self.noise, self.coords)
        return {key: value for key, value in pair.items() if value is not None}


class PosePairDataset(PairSet):
    """A fixed set of ``length`` pose-morphing pairs: one appearance in two poses.

    Item i is pair i of the source (a ``Mannequin``: ``pair(seed, i)``, a new appearance and two
    random poses; ``DeepFashion``: ``pair(i % len(pairs))`` of its pairs file). Keys: ``source``
    (M1), ``source_pose`` (B1), ``target`` (M2), ``target_pose`` (B2), and the affine
    self-supervision pair of the source (``affine_pair`` of M1 with its own generator seeded by
    (seed, i)): ``self_target`` and ``self_target_pose``, whose source is M1 with B1. A Mannequin
    item also has ``correspondence`` [2, H, W] (``Mannequin.correspondence``: the true source
    pixel of every visible figure pixel of the target, -1 elsewhere).

    Args:
        source: a Mannequin, or a DeepFashion with a pairs file.
        length: number of items.
        seed: the set's seed (Mannequin; DeepFashion pairs are taken in file order).
        sigma: heatmap sigma in pixels.
        noise: the self-supervision warp, theta = identity + U(-noise, noise).
        coords: both poses also get 2 coordinate channels: the source its coordinate map, the
            target where each of its pixels lies in the source as far as the keypoints tell
            (``limb_flow``); the self-supervision pair its warped coordinate map.
    """

    def __init__(
        self,
        source: Mannequin | DeepFashion,
        length: int,
        seed: int,
        sigma: float,
        noise: float = WARP_NOISE,
        coords: bool = False,
    ) -> None:
        if not isinstance(source, Mannequin | DeepFashion):
            raise ValueError(
                f"pose pairs need a Mannequin or a DeepFashion source, got {type(source).__name__}"
            )
        if isinstance(source, DeepFashion) and not source.pairs():
            raise ValueError("pose pairs from DeepFashion need its pairs file (data.pairs)")
        super().__init__(source, length, seed, sigma, noise, coords)

    def __getitem__(self, index: int) -> dict:
        generator = self.generator(index, _POSE_ITEM)
        with single_thread():
            if isinstance(self.source, Mannequin):
                first, second = self.source.pair(self.seed, index)
            else:
                first, second = self.source.pair(index % len(self.source.pairs()))
            item = {
                "source": first["image"],
                "source_pose": heatmaps(first["keypoints"], self.size, self.sigma),
                "target": second["image"],
                "target_pose": heatmaps(second["keypoints"], self.size, self.sigma),
            }
            if self.coords:
                flow = limb_flow(first["keypoints"], second["keypoints"], self.size)
                item["source_pose"] = torch.cat([item["source_pose"], coordinate_map(self.size)])
                item["target_pose"] = torch.cat([item["target_pose"], flow])
            warped = affine_pair(first, generator, self.sigma, self.noise, self.coords)
            item["self_target"], item["self_target_pose"] = warped["target"], warped["target_pose"]
            if isinstance(self.source, Mannequin):
                item["correspondence"] = Mannequin.correspondence(first, second)
        return item
