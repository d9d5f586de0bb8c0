"""Finding the images, labels and ground-truth masks of an evaluation data set.

Two layouts are read: MVTec AD (``ROOT/<category>/{train,test,ground_truth}/...``) and plain
folders (good training images, good and defective test images, optional masks). Files are only
checked here (header and :meth:`PIL.Image.Image.verify`), so that a bad file is reported before a
long run starts; decoding pixels is left to :func:`patchcore.images.read_image`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..engine.images import IMAGE_SUFFIXES, list_images
from ..errors import ImageLoadError

#: EXIF orientation tag; its values 5-8 turn the image by 90 degrees (width and height swap).
ORIENTATION_TAG = 0x0112
ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})

#: Image modes whose arrays hold mask values directly (others are converted to RGB first).
_DIRECT_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "RGB", "RGBA"})


@dataclass(frozen=True)
class TestSample:
    """One test image: label 0 (good) or 1 (defective), its defect type, and its mask file if any."""

    __test__ = False  # tell pytest this is not a test class

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None


@dataclass
class Dataset:
    """Good training images and labelled test images; ``skipped`` lists bad files left out."""

    name: str
    train: list[Path]
    test: list[TestSample]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        """Whether pixel metrics can be computed: there are defective images and each has a mask."""
        defective = [sample for sample in self.test if sample.label == 1]
        return bool(defective) and all(sample.mask_path is not None for sample in defective)


@dataclass
class _BadFiles:
    """Raises the error for a bad file or, with ``skip_bad``, warns and records the file as skipped."""

    skip_bad: bool
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def report(self, path: Path, error: ImageLoadError) -> None:
        if not self.skip_bad:
            raise error
        reason = error.problem if error.source == str(path) else str(error)
        warnings.warn(f"skipping {path}: {reason}", stacklevel=4)
        self.skipped.append((path, reason))


def check_image_file(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file, after a cheap integrity check; :class:`ImageLoadError` if bad."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(str(path), "file not found" if not path.exists() else "not a file")
    try:
        with Image.open(path) as image:
            width, height = image.size
            image.verify()  # checks chunk structure and checksums (PNG) without decoding pixels
        with Image.open(path) as image:  # verify() spends the file object; the header is cheap to read again
            if image.getexif().get(ORIENTATION_TAG, 1) in ROTATED_ORIENTATIONS:
                width, height = height, width  # read upright, as every viewer shows it
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(str(path), f"image is too large to decode safely ({exc})") from exc
    except UnidentifiedImageError:
        raise ImageLoadError(str(path), "not an image file, or an image format Pillow cannot read") from None
    except Exception as exc:  # verify() raises many kinds (SyntaxError, OSError, struct.error, ...)
        raise ImageLoadError(str(path), f"corrupt or truncated image ({exc})") from exc
    if width < 1 or height < 1:
        raise ImageLoadError(str(path), "image has no pixels")
    return height, width


def _checked_images(folder: Path, bad: _BadFiles) -> list[tuple[Path, tuple[int, int]]]:
    """The image files in ``folder`` that pass the check, each with its (height, width)."""
    found = []
    for path in list_images(folder):
        try:
            found.append((path, check_image_file(path)))
        except ImageLoadError as error:
            bad.report(path, error)
    return found


def _mask_index(folder: Path) -> dict[str, list[Path]]:
    """Image files in a mask folder by stem (empty if the folder does not exist)."""
    index: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                index.setdefault(path.stem, []).append(path)
    return index


def _find_mask(index: dict[str, list[Path]], image: Path, stems: list[str]) -> Path | None:
    """The one mask whose stem is among ``stems``; more than one is an error naming them."""
    candidates = [path for stem in stems for path in index.get(stem, [])]
    if len(candidates) > 1:
        names = ", ".join(path.name for path in candidates)
        raise ImageLoadError(str(image), f"more than one mask matches this image: {names}")
    return candidates[0] if candidates else None


def _check_mask_size(image: Path, size: tuple[int, int], mask: Path) -> None:
    mask_size = check_image_file(mask)
    if mask_size != size:
        raise ImageLoadError(
            str(mask),
            f"mask is {mask_size[1]}x{mask_size[0]} pixels but its image {image} is {size[1]}x{size[0]}",
        )


def _require_images(found: list, folder: Path) -> None:
    if not found:
        raise ImageLoadError(str(folder), "no readable images left after skipping bad files")


def _require_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise ImageLoadError(str(folder), f"{what} not found" if not folder.exists() else f"{what} is not a folder")


def mvtec_categories(root: str | os.PathLike) -> list[str]:
    """Names of the category folders under an MVTec AD root (those with ``train/good``), sorted."""
    root = Path(root)
    _require_folder(root, "MVTec root folder")
    names = sorted(entry.name for entry in root.iterdir() if (entry / "train" / "good").is_dir())
    if not names:
        raise ImageLoadError(str(root), "holds no MVTec categories (folders with train/good inside)")
    return names


def load_mvtec_category(root: str | os.PathLike, category: str, skip_bad: bool = False) -> Dataset:
    """One MVTec AD category: ``train/good``, ``test/<defect>`` and ``ground_truth/<defect>/<stem>_mask.png``.

    Every defective test image must have a mask of its own size. A bad file raises
    :class:`ImageLoadError` naming it; with ``skip_bad`` it is left out with a warning instead and
    listed in ``Dataset.skipped``. Missing or empty folders always raise.
    """
    root = Path(root)
    _require_folder(root, "MVTec root folder")
    folder = root / category
    if not (folder / "train" / "good").is_dir():
        known = [entry.name for entry in sorted(root.iterdir()) if (entry / "train" / "good").is_dir()]
        raise ImageLoadError(
            str(folder), f"no such MVTec category (a folder with train/good); found: {', '.join(known) or 'none'}"
        )
    bad = _BadFiles(skip_bad)
    train = [path for path, _ in _checked_images(folder / "train" / "good", bad)]
    _require_images(train, folder / "train" / "good")

    test_root = folder / "test"
    _require_folder(test_root, "test folder")
    defect_folders = sorted(entry for entry in test_root.iterdir() if entry.is_dir())
    if not defect_folders:
        raise ImageLoadError(str(test_root), "holds no folders (expected good/ and one per defect type)")
    test: list[TestSample] = []
    for defect_folder in defect_folders:
        defect = defect_folder.name
        masks = _mask_index(folder / "ground_truth" / defect) if defect != "good" else {}
        for path, size in _checked_images(defect_folder, bad):
            if defect == "good":
                test.append(TestSample(path, 0, "good"))
                continue
            expected = folder / "ground_truth" / defect / f"{path.stem}_mask.png"
            try:
                mask = _find_mask(masks, path, [f"{path.stem}_mask"])
                if mask is None:
                    raise ImageLoadError(str(path), f"no ground-truth mask; expected {expected}")
                _check_mask_size(path, size, mask)
            except ImageLoadError as error:
                bad.report(path, error)
                continue
            test.append(TestSample(path, 1, defect, mask))
    return Dataset(category, train, test, bad.skipped)


def load_folder_dataset(
    train_good: str | os.PathLike,
    test_good: str | os.PathLike | None = None,
    test_defective: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    skip_bad: bool = False,
    name: str | None = None,
) -> Dataset:
    """A data set from plain folders of images; ``name`` defaults to the training folder's name.

    Masks are matched to defective images by stem: ``<stem>.<ext>`` or ``<stem>_mask.<ext>``.
    A defective image without a mask is allowed (with a warning when ``masks`` is given); then
    ``Dataset.has_masks`` is False and pixel metrics should be skipped. Bad files are handled as
    in :func:`load_mvtec_category`.
    """
    train_folder = Path(train_good)
    if masks is not None and test_defective is None:
        raise ValueError("masks were given without test_defective images to pair them with")
    bad = _BadFiles(skip_bad)
    train = [path for path, _ in _checked_images(train_folder, bad)]
    _require_images(train, train_folder)

    test: list[TestSample] = []
    if test_good is not None:
        test += [TestSample(path, 0, "good") for path, _ in _checked_images(Path(test_good), bad)]
    if test_defective is not None:
        defect = Path(test_defective).name
        index: dict[str, list[Path]] = {}
        if masks is not None:
            _require_folder(Path(masks), "mask folder")
            index = _mask_index(Path(masks))
        samples, unmasked = _defective_samples(Path(test_defective), defect, index, bad)
        test += samples
        if masks is not None and unmasked:
            warnings.warn(
                f"{len(unmasked)} defective image(s) have no mask in {masks} (e.g. {unmasked[0]}); "
                "pixel metrics will be skipped",
                stacklevel=2,
            )
    return Dataset(name or train_folder.name, train, test, bad.skipped)


#: Folder names in a plain layout that hold masks or training images, not a defect type.
_NOT_DEFECTS = frozenset({"good", "masks", "ground_truth", "train"})


def load_folder_layout(
    root: str | os.PathLike,
    train: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    test_share: float = 0.2,
    seed: int = 0,
    skip_bad: bool = False,
) -> Dataset:
    """A data set in a plain folder layout: ``root/good/`` and one folder per defect type.

    Training images come from ``train``, else ``root/train/``, else a seeded split of ``good/``
    (``test_share`` of the good images are held out for testing, the rest fit the model). Masks are
    optional: ``masks``, else ``root/masks/`` or ``root/ground_truth/``, holding ``<stem>.<ext>`` or
    ``<stem>_mask.<ext>`` either directly or in a sub-folder per defect type. Bad files are handled
    as in :func:`load_mvtec_category`.
    """
    root = Path(root)
    _require_folder(root, "data set folder")
    _require_folder(root / "good", "good/ folder (good images)")
    defect_folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name not in _NOT_DEFECTS)
    if not defect_folders:
        raise ImageLoadError(str(root), "holds no defect folders beside good/ (one folder per defect type)")
    if masks is None:
        masks = next((root / name for name in ("masks", "ground_truth") if (root / name).is_dir()), None)
    elif not Path(masks).is_dir():
        _require_folder(Path(masks), "mask folder")
    bad = _BadFiles(skip_bad)
    good = [path for path, _ in _checked_images(root / "good", bad)]
    _require_images(good, root / "good")
    train_folder = Path(train) if train is not None else (root / "train" if (root / "train").is_dir() else None)
    if train_folder is not None:
        train_images = [path for path, _ in _checked_images(train_folder, bad)]
        _require_images(train_images, train_folder)
        test_good = good
    else:
        if not 0.0 < test_share < 1.0 or len(good) < 2:
            raise ImageLoadError(str(root / "good"), f"needs at least 2 images and 0 < test_share < 1 to hold some out "
                                                     f"for testing (got {len(good)} images, test_share {test_share}); "
                                                     "or give the training images with --train")
        held_out = max(1, int(round(test_share * len(good))))
        order = np.random.default_rng(seed).permutation(len(good))
        test_good = sorted(good[i] for i in order[:held_out])
        train_images = sorted(good[i] for i in order[held_out:])
    test = [TestSample(path, 0, "good") for path in test_good]
    flat_masks = _mask_index(Path(masks)) if masks is not None else {}
    unmasked = []
    for folder in defect_folders:
        index = {**flat_masks, **_mask_index(Path(masks) / folder.name)} if masks is not None else {}
        samples, missing = _defective_samples(folder, folder.name, index, bad)
        test += samples
        unmasked += missing
    if masks is not None and unmasked:
        warnings.warn(f"{len(unmasked)} defective image(s) have no mask in {masks} (e.g. {unmasked[0]}); "
                      "pixel metrics will be skipped", stacklevel=2)
    return Dataset(root.resolve().name, train_images, test, bad.skipped)


def _defective_samples(folder: Path, defect: str, masks: dict[str, list[Path]], bad: _BadFiles) -> tuple[list[TestSample], list[str]]:
    """The defective images of ``folder``, each with its mask from ``masks`` (by ``<stem>`` or
    ``<stem>_mask``) when there is one; and the names of those without."""
    samples, unmasked = [], []
    for path, size in _checked_images(folder, bad):
        try:
            mask = _find_mask(masks, path, [path.stem, f"{path.stem}_mask"])
            if mask is not None:
                _check_mask_size(path, size, mask)
        except ImageLoadError as error:
            bad.report(path, error)
            continue
        if mask is None:
            unmasked.append(path.name)
        samples.append(TestSample(path, 1, defect, mask))
    return samples, unmasked


def _read_mask_array(path: Path) -> np.ndarray:
    """A mask file as a 2-D bool array: any non-zero colour value is anomalous (alpha is ignored)."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)  # upright, as its photo is read
            if image.mode in ("P", "PA"):
                image = image.convert("RGBA")  # palette index 0 need not be black
            elif image.mode not in _DIRECT_MODES:
                image = image.convert("RGB")
            has_alpha = image.mode in ("LA", "RGBA")
            array = np.asarray(image)
    except UnidentifiedImageError:
        raise ImageLoadError(str(path), "not an image file, or an image format Pillow cannot read") from None
    except Exception as exc:
        raise ImageLoadError(str(path), f"corrupt or truncated mask ({exc})") from exc
    if array.ndim == 3:
        colour = array[..., :-1] if has_alpha else array
        return (colour != 0).any(axis=2)
    return array != 0


def load_mask(sample: TestSample, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """The ground-truth mask of ``sample`` as a (height, width) bool array, True where anomalous.

    Any non-zero pixel counts as anomalous (some data sets store class codes such as 253-255), so
    masks should be stored losslessly (PNG, not JPEG). A good sample without a mask gives an
    all-False array. ``image_size`` is the image's (height, width); when omitted it is read
    from the image file's header.
    """
    size = tuple(image_size) if image_size is not None else check_image_file(sample.path)
    if sample.mask_path is None:
        if sample.label != 0:
            raise ImageLoadError(str(sample.path), "defective image has no ground-truth mask")
        return np.zeros(size, dtype=bool)
    mask = _read_mask_array(Path(sample.mask_path))
    if mask.shape != size:
        raise ImageLoadError(
            str(sample.mask_path),
            f"mask is {mask.shape[1]}x{mask.shape[0]} pixels but its image {sample.path} is {size[1]}x{size[0]}",
        )
    return mask
