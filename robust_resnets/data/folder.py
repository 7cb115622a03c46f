"""Image folders (``<root>/<class>/<image>``) as uint8 tensors, from a directory or a .tar(.gz) archive.

The class index is the position of the class folder's name in sorted order (torchvision's
ImageFolder convention), unless a class list is given.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ['IMAGE_EXTENSIONS', 'is_archive', 'list_image_folder', 'read_images', 'load_image_folder',
           'interleave_classes']

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.webp', '.tif', '.tiff')
PathLike = Union[str, Path]
Transform = Callable[[Image.Image], Image.Image]


def is_archive(path: PathLike) -> bool:
    """True for a .tar, .tar.gz or .tgz file."""
    name = str(path).lower()
    return Path(path).is_file() and name.endswith(('.tar', '.tar.gz', '.tgz'))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_folder(root: PathLike, *, subdir: Optional[str] = None) -> List[Tuple[str, str]]:
    """Lists ``(class name, image path)`` pairs under ``root[/subdir]/<class>/``, sorted by class then file.

    Args:
        root: A directory or a .tar(.gz) archive; archive paths are member names.
        subdir: Folder inside ``root`` holding the class folders (e.g. 'test', 'val').

    Raises:
        FileNotFoundError: ``root`` (or ``subdir`` in it) does not exist.
        ValueError: No ``<class>/<image>`` files are there, or a class folder holds no images (it would
            shift the labels of the classes after it).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f'Dataset path {root} does not exist. Point eval\'s --data-dir (train: data.root) at '
                                f'the dataset folder or archive.')
    items: List[Tuple[str, str]] = []
    class_folders = set()
    if is_archive(root):
        prefix = PurePosixPath(subdir) if subdir else None
        with tarfile.open(root) as tar:
            for member in tar:
                path = PurePosixPath(member.name.removeprefix('./'))
                if prefix is not None:
                    if not path.is_relative_to(prefix):
                        continue
                    path = path.relative_to(prefix)
                if member.isdir() and len(path.parts) == 1:
                    class_folders.add(path.parts[0])
                elif member.isfile() and _is_image(member.name) and len(path.parts) == 2:
                    items.append((path.parts[0], member.name))
        where = f'{root}' + (f' (under {subdir}/)' if subdir else '')
    else:
        base = root / subdir if subdir else root
        if not base.is_dir():
            raise FileNotFoundError(f'Expected a folder {base} with one sub-folder per class, but it does not exist.')
        for class_dir in base.iterdir():
            if class_dir.is_dir():
                class_folders.add(class_dir.name)
                items.extend((class_dir.name, str(f)) for f in class_dir.iterdir() if f.is_file() and _is_image(f.name))
        where = str(base)
    if not items:
        raise ValueError(f'No images found in {where}: expected <class>/<image>{IMAGE_EXTENSIONS[0]} files '
                         f'(an ImageFolder layout).')
    empty = sorted(class_folders - {c for c, _ in items})
    if empty:
        raise ValueError(f'Class folders {empty[:5]} in {where} hold no images, which would shift the labels of the '
                         f'classes after them. Add their images, or remove the empty folders.')
    return sorted(items)


def _open_rgb(data: Union[bytes, str], transform: Optional[Transform], *, name: str, root: PathLike) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img = img.convert('RGB')
            if transform is not None:
                img = transform(img)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
    except (OSError, ValueError, SyntaxError) as e:  # PIL: truncated or unidentified image, bad header
        where = f'{name} in {root}' if is_archive(root) else name
        raise ValueError(f'Cannot decode the image {where} ({e}). The file is damaged or not an image: extract or '
                         f'download the dataset again, or remove that file.') from e


def read_images(root: PathLike, paths: Sequence[str], *, transform: Optional[Transform] = None,
                progress: bool = False) -> Tensor:
    """Decodes images into a uint8 N x 3 x H x W tensor, in the order of ``paths``.

    Args:
        root: The directory or .tar(.gz) archive the paths belong to.
        paths: Image file paths (directory) or member names (archive), e.g. from :func:`list_image_folder`.
        transform: Maps each RGB PIL image to a PIL image of a size common to all (e.g. resize and crop).
        progress: Show a progress bar.

    Raises:
        FileNotFoundError: An archive lacks some of ``paths``.
        ValueError: An image cannot be decoded, or the images differ in size.
    """
    from tqdm.auto import tqdm

    wanted = {p: i for i, p in enumerate(paths)}
    arrays: List[Optional[np.ndarray]] = [None] * len(paths)
    bar = tqdm(total=len(paths), desc='decode', unit='img', disable=not progress)
    if is_archive(root):
        with tarfile.open(root) as tar:
            for member in tar:
                i = wanted.get(member.name)
                if i is not None:
                    arrays[i] = _open_rgb(tar.extractfile(member).read(), transform, name=member.name, root=root)
                    bar.update()
    else:
        for p, i in wanted.items():
            arrays[i] = _open_rgb(p, transform, name=p, root=root)
            bar.update()
    bar.close()
    missing = [p for p, a in zip(paths, arrays) if a is None]
    if missing:
        raise FileNotFoundError(f'{len(missing)} images were not found in {root}, e.g. {missing[0]}.')
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f'Images in {root} have different sizes {sorted(shapes)[:3]}; give a transform that '
                         f'resizes and crops them to one size.')
    return torch.from_numpy(np.stack(arrays))


def interleave_classes(labels: Sequence[int]) -> List[int]:
    """An order that takes the first image of every class, then the second, ...: any prefix is class-balanced."""
    rank: Dict[int, int] = {}
    keys = []
    for i, label in enumerate(labels):
        r = rank.get(label, 0)
        rank[label] = r + 1
        keys.append((r, label, i))
    return [i for _, _, i in sorted(keys)]


def load_image_folder(
        root: PathLike,
        *,
        subdir: Optional[str] = None,
        classes: Union[Sequence[str], Callable[[List[str]], Sequence[str]], None] = None,
        transform: Optional[Transform] = None,
        interleave: bool = False,
        progress: bool = False,
) -> Tuple[Tensor, Tensor, List[str]]:
    """Loads an ImageFolder into ``(uint8 images N x 3 x H x W, int64 labels N, class names)``.

    Args:
        root: A directory or .tar(.gz) archive.
        subdir: Folder inside root holding the class folders (e.g. 'test', 'val').
        classes: Class names in label order (default: the sorted class folder names), or a function from
            the sorted folder names found to that order (it raises for folders it refuses). Folders not
            listed are an error.
        transform: PIL image -> PIL image, applied to every image (all outputs must share one size).
        interleave: Return images in :func:`interleave_classes` order instead of class by class.
        progress: Show a progress bar while decoding.

    Raises:
        FileNotFoundError: ``root`` (or ``subdir`` in it) does not exist.
        ValueError: No images, an empty class folder, a class folder not in ``classes``, an image that cannot
            be decoded, or images of different sizes (without a ``transform``).
    """
    items = list_image_folder(root, subdir=subdir)
    found = sorted({c for c, _ in items})
    classes = list(classes(found) if callable(classes) else classes if classes is not None else found)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise ValueError(f'Class folders {unknown[:5]} in {root} are not among the {len(classes)} expected classes.')
    labels = [index[c] for c, _ in items]
    order = interleave_classes(labels) if interleave else list(range(len(items)))
    images = read_images(root, [items[i][1] for i in order], transform=transform, progress=progress)
    return images, torch.tensor([labels[i] for i in order], dtype=torch.int64), classes

