"""Data: CIFAR from ImageFolders and archives with a cache, clear errors, RobustBench's ImageNet subset and preprocessing."""
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robust_resnets.data import (
    imagenet_subset_ids, imagenet_transform, imagenet_wnids, load_cifar_tensors, load_imagenet_tensors,
)
from robust_resnets.data import folder as folder_module

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
CIFAR_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def write_folder(root: Path, classes, per_class: int, size=(32, 32), split='test', ext='png') -> dict:
    rng = np.random.default_rng(0)
    pixels = {}
    for c in classes:
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / split / c / f'{i:04d}.{ext}')
            pixels[(c, i)] = arr
    return pixels


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('ROBUST_RESNETS_CACHE', str(tmp_path / 'user-cache'))
    return tmp_path / 'user-cache'


def test_image_folder_loads_class_interleaved_and_is_cached(tmp_path, monkeypatch):
    pixels = write_folder(tmp_path / 'c10', CIFAR_CLASSES, per_class=3)
    images, labels = load_cifar_tensors(root=tmp_path / 'c10')
    assert images.dtype == torch.uint8 and images.shape == (30, 3, 32, 32) and labels.dtype == torch.int64
    assert labels.tolist() == list(range(10)) * 3  # any prefix is class-balanced
    assert np.array_equal(images[11].permute(1, 2, 0).numpy(), pixels[('automobile', 1)])  # lossless PNG
    assert (tmp_path / 'c10' / 'cifar10-test.npz').is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError('decoded again instead of reading the cache')

    monkeypatch.setattr('robust_resnets.data.cifar.load_image_folder', no_decoding)
    again, again_labels = load_cifar_tensors(root=tmp_path / 'c10')
    assert torch.equal(again, images) and torch.equal(again_labels, labels)


def test_archive_gives_the_same_tensors_and_caches_in_the_user_cache_when_read_only(tmp_path, user_cache):
    write_folder(tmp_path / 'src', CIFAR_CLASSES, per_class=2)
    folder_images, folder_labels = load_cifar_tensors(root=tmp_path / 'src')
    shelf = tmp_path / 'shelf'
    shelf.mkdir()
    with tarfile.open(shelf / 'cifar10-jpeg.tar.gz', 'w:gz') as tar:
        tar.add(tmp_path / 'src' / 'test', arcname='test')
    shelf.chmod(stat.S_IRUSR | stat.S_IXUSR)  # read-only, like ../shared/data
    try:
        for root in (shelf, shelf / 'cifar10-jpeg.tar.gz'):
            images, labels = load_cifar_tensors(root=root)
            assert torch.equal(images, folder_images) and torch.equal(labels, folder_labels)
        assert sorted(os.listdir(shelf)) == ['cifar10-jpeg.tar.gz']  # nothing written beside a read-only archive
        assert len(list((user_cache / 'data').glob('cifar10-test-*.npz'))) == 1
    finally:
        shelf.chmod(stat.S_IRWXU)


def test_clear_errors_for_missing_or_malformed_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match='No cifar10 data in'):
        load_cifar_tensors(root=tmp_path / 'missing')
    write_folder(tmp_path / 'three', CIFAR_CLASSES[:3], per_class=1)
    with pytest.raises(ValueError, match='has 3 class folders'):
        load_cifar_tensors(root=tmp_path / 'three')
    write_folder(tmp_path / 'big', CIFAR_CLASSES, per_class=1, size=(40, 40))
    with pytest.raises(ValueError, match='32 x 32'):
        load_cifar_tensors(root=tmp_path / 'big')
    (tmp_path / 'empty' / 'test' / 'cat').mkdir(parents=True)
    with pytest.raises(ValueError, match='No images found'):
        load_cifar_tensors(root=tmp_path / 'empty')
    with pytest.raises(ValueError, match='Unknown CIFAR dataset'):
        load_cifar_tensors(root=tmp_path, dataset='cifar11')
    with pytest.raises(ValueError, match="split"):
        load_cifar_tensors(root=tmp_path, split='val')


def test_robustbench_imagenet_lists():
    ids, wnids = imagenet_subset_ids(), imagenet_wnids()
    assert len(ids) == 5000 and len(set(ids)) == 5000
    assert len(wnids) == 1000 and list(wnids) == sorted(set(wnids))
    assert all(i.split('/')[0] in set(wnids) and i.endswith('.JPEG') for i in ids)


def test_imagenet_preprocessing_is_resize_by_crop_pct_then_centre_crop():
    from torchvision import transforms

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    out = imagenet_transform()(img)
    assert out.size == (224, 224)
    reference = transforms.CenterCrop(224)(transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC)(img))
    assert np.array_equal(np.asarray(out), np.asarray(reference))
    assert imagenet_transform(resolution=288, crop_pct=1.0)(img).size == (288, 288)
    with pytest.raises(ValueError, match='crop_pct'):
        imagenet_transform(crop_pct=1.5)


def test_imagenet_folder_subsets(tmp_path):
    wnids = imagenet_wnids()
    ids = imagenet_subset_ids()[:3]
    for i in ids:  # RobustBench's first three images, as JPEGs of another size
        path = tmp_path / 'val' / i
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((260, 300, 3), 100, dtype=np.uint8)).save(path, format='JPEG')
    images, labels = load_imagenet_tensors(root=tmp_path, n_examples=3, progress=False)
    assert images.shape == (3, 3, 224, 224) and images.dtype == torch.uint8
    assert labels.tolist() == [wnids.index(i.split('/')[0]) for i in ids]
    with pytest.raises(FileNotFoundError, match="4 of the 4 images|1 of the 4 images"):
        load_imagenet_tensors(root=tmp_path, n_examples=4, progress=False)
    images, _ = load_imagenet_tensors(root=tmp_path / 'val', subset='all', n_examples=None, resolution=64,
                                      progress=False)
    assert images.shape == (3, 3, 64, 64)
    (tmp_path / 'val' / 'not_a_wnid').mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / 'val' / 'not_a_wnid' / 'x.png')
    with pytest.raises(ValueError, match='WordNet'):
        load_imagenet_tensors(root=tmp_path, subset='all', progress=False)


@pytest.mark.skipif(not (SHARED_DATA / 'imagenet-sample-224.tar.gz').is_file(),
                    reason='../shared/data/imagenet-sample-224.tar.gz is not present (ImageNet sample)')
def test_imagenet_sample_through_preprocessing_and_a_tiny_model():
    import torch.nn as nn

    images, labels = load_imagenet_tensors(root=SHARED_DATA / 'imagenet-sample-224.tar.gz', subset='all',
                                           n_examples=12, progress=False)
    assert images.shape == (12, 3, 224, 224) and labels.tolist() == list(range(12))
    assert images.float().std() > 10  # real pictures, not blank
    model = nn.Sequential(nn.Conv2d(3, 4, 7, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 1000)).eval()
    with torch.inference_mode():
        assert model(images.float() / 255).shape == (12, 1000)


def test_folder_listing_of_archives_with_a_prefix(tmp_path):
    write_folder(tmp_path / 'src', ['a', 'b'], per_class=2, split='val', size=(8, 8))
    archive = tmp_path / 'x.tar'
    with tarfile.open(archive, 'w') as tar:
        tar.add(tmp_path / 'src' / 'val', arcname='./val')
    items = folder_module.list_image_folder(archive, subdir='val')
    assert [c for c, _ in items] == ['a', 'a', 'b', 'b']
    images, labels, classes = folder_module.load_image_folder(archive, subdir='val')
    assert images.shape == (4, 3, 8, 8) and classes == ['a', 'b'] and labels.tolist() == [0, 0, 1, 1]
