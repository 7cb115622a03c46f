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


def test_image_folder_loads_class_interleaved_and_is_cached(tmp_path, monkeypatch, user_cache):
    pixels = write_folder(tmp_path / 'c10', CIFAR_CLASSES, per_class=3)
    images, labels = load_cifar_tensors(root=tmp_path / 'c10')
    assert images.dtype == torch.uint8 and images.shape == (30, 3, 32, 32) and labels.dtype == torch.int64
    assert labels.tolist() == list(range(10)) * 3  # any prefix is class-balanced
    assert np.array_equal(images[11].permute(1, 2, 0).numpy(), pixels[('automobile', 1)])  # lossless PNG
    assert len(list((user_cache / 'data').glob('cifar10-test-*.npz'))) == 1
    assert sorted(os.listdir(tmp_path / 'c10')) == ['test']  # nothing written beside the data

    def no_decoding(*args, **kwargs):
        raise AssertionError('decoded again instead of reading the cache')

    monkeypatch.setattr('robust_resnets.data.cifar.load_image_folder', no_decoding)
    again, again_labels = load_cifar_tensors(root=tmp_path / 'c10')
    assert torch.equal(again, images) and torch.equal(again_labels, labels)


def test_archive_gives_the_same_tensors_and_one_cache_file(tmp_path, user_cache):
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
        assert len(list((user_cache / 'data').glob('cifar10-test-*.npz'))) == 2  # the folder's, the archive's
    finally:
        shelf.chmod(stat.S_IRWXU)


def test_clear_errors_for_missing_or_malformed_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match='No cifar10 data in'):
        load_cifar_tensors(root=tmp_path / 'missing')
    write_folder(tmp_path / 'three', CIFAR_CLASSES[:3], per_class=1)
    with pytest.raises(ValueError, match='has 3 class folders, but cifar10 has 10'):
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


def test_cache_is_rebuilt_when_an_image_changes_or_the_dataset_differs(tmp_path):
    pixels = write_folder(tmp_path / 'c10', CIFAR_CLASSES, per_class=1)
    images, _ = load_cifar_tensors(root=tmp_path / 'c10')
    # another image under the same name (same size, a new modification time), then one more image
    cat = tmp_path / 'c10' / 'test' / 'cat' / '0000.png'
    Image.fromarray(255 - pixels[('cat', 0)]).save(cat)
    os.utime(cat, ns=(1, cat.stat().st_mtime_ns + 10 ** 9))
    edited, labels = load_cifar_tensors(root=tmp_path / 'c10')
    assert np.array_equal(edited[3].permute(1, 2, 0).numpy(), 255 - pixels[('cat', 0)]) and labels[3] == 3
    Image.fromarray(pixels[('dog', 0)]).save(tmp_path / 'c10' / 'test' / 'dog' / '0001.png')
    assert load_cifar_tensors(root=tmp_path / 'c10')[0].shape[0] == 11
    # a cached CIFAR-10 source asked for as CIFAR-100 is checked again, not returned from the cache
    with pytest.raises(ValueError, match='has 10 class folders, but cifar100 has 100'):
        load_cifar_tensors(root=tmp_path / 'c10', dataset='cifar100')


def test_class_folders_must_be_the_datasets_classes(tmp_path):
    """Sorted folder names give the labels only when they are the dataset's own names (or label numbers)."""
    aliases = ['plane', 'car', *CIFAR_CLASSES[2:]]  # PyTorch's tutorial names sort into other positions
    write_folder(tmp_path / 'alias', aliases, per_class=1)
    images, labels = load_cifar_tensors(root=tmp_path / 'alias')
    write_folder(tmp_path / 'std', CIFAR_CLASSES, per_class=1)  # the same pixels (the same seed) under the names
    reference, reference_labels = load_cifar_tensors(root=tmp_path / 'std')
    assert torch.equal(images, reference) and torch.equal(labels, reference_labels)
    write_folder(tmp_path / 'numbers', [f'{i:02d}' for i in range(10)], per_class=1)
    assert load_cifar_tensors(root=tmp_path / 'numbers')[1].tolist() == list(range(10))
    write_folder(tmp_path / 'other', ['cow', *CIFAR_CLASSES[1:]], per_class=1)
    with pytest.raises(ValueError, match=r"Class folders \['cow'\] .* are not cifar10 class names"):
        load_cifar_tensors(root=tmp_path / 'other')


def test_empty_class_folders_and_damaged_images_are_named(tmp_path):
    write_folder(tmp_path / 'c10', CIFAR_CLASSES, per_class=1)
    (tmp_path / 'c10' / 'test' / 'zebra').mkdir()
    with pytest.raises(ValueError, match=r"Class folders \['zebra'\] .* hold no images"):
        load_cifar_tensors(root=tmp_path / 'c10')
    (tmp_path / 'c10' / 'test' / 'zebra').rmdir()
    bird = tmp_path / 'c10' / 'test' / 'bird' / '0000.png'
    bird.write_bytes(bird.read_bytes()[:60])  # truncated
    with pytest.raises(ValueError, match=f'Cannot decode the image {bird}'):
        load_cifar_tensors(root=tmp_path / 'c10')
    with tarfile.open(tmp_path / 'cifar10-jpeg.tar.gz', 'w:gz') as tar:
        tar.add(tmp_path / 'c10' / 'test', arcname='test')
    with pytest.raises(ValueError, match='Cannot decode the image test/bird/0000.png in .*cifar10-jpeg.tar.gz'):
        load_cifar_tensors(root=tmp_path / 'cifar10-jpeg.tar.gz')


@pytest.mark.skipif(not (SHARED_DATA / 'cifar10-jpeg.tar.gz').is_file(),
                    reason='../shared/data/cifar10-jpeg.tar.gz is not present (CIFAR-10 as JPEG)')
def test_real_cifar10_archive_test_split():
    images, labels = load_cifar_tensors(root=SHARED_DATA / 'cifar10-jpeg.tar.gz', split='test', progress=False)
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert torch.bincount(labels[:100]).tolist() == [10] * 10  # any prefix is class-balanced
    assert 60 < images.float().mean() < 200 and images.float().std() > 30  # real pictures


def test_robustbench_imagenet_lists():
    ids, wnids = imagenet_subset_ids(), imagenet_wnids()
    assert len(ids) == 5000 and len(set(ids)) == 5000
    assert len(wnids) == 1000 and list(wnids) == sorted(set(wnids))
    assert all(i.split('/')[0] in set(wnids) and i.endswith('.JPEG') for i in ids)


def test_imagenet_preprocessing_is_robustbenchs_resize_then_centre_crop():
    """The default is RobustBench's Res256Crop224 (bilinear); bicubic is its BicubicRes256Crop224."""
    from torchvision import transforms

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    bicubic = transforms.InterpolationMode.BICUBIC
    for ours, reference in (
            (imagenet_transform(), transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])),
            (imagenet_transform(interpolation='bicubic'),
             transforms.Compose([transforms.Resize(256, interpolation=bicubic), transforms.CenterCrop(224)]))):
        assert ours(img).size == (224, 224)
        assert np.array_equal(np.asarray(ours(img)), np.asarray(reference(img)))
    assert not np.array_equal(np.asarray(imagenet_transform()(img)),
                              np.asarray(imagenet_transform(interpolation='bicubic')(img)))
    assert imagenet_transform(resolution=288, crop_pct=1.0)(img).size == (288, 288)
    with pytest.raises(ValueError, match='crop_pct'):
        imagenet_transform(crop_pct=1.5)


def test_imagenet_preprocessing_equals_robustbenchs_own():
    rb_data = pytest.importorskip('robustbench.data', reason='robustbench is not installed', exc_type=ImportError)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (333, 257, 3), dtype=np.uint8))
    for name, interpolation in (('Res256Crop224', 'bilinear'), ('BicubicRes256Crop224', 'bicubic')):
        theirs = rb_data.PREPROCESSINGS[name](img)  # a float tensor in [0, 1]
        ours = torch.from_numpy(np.asarray(imagenet_transform(interpolation=interpolation)(img)).copy())
        assert torch.equal((theirs * 255).round().to(torch.uint8), ours.permute(2, 0, 1)), name


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
    with pytest.raises(ValueError, match="subset has 5000 images, fewer than n_examples=5001"):
        load_imagenet_tensors(root=tmp_path, n_examples=5001, progress=False)
    with pytest.raises(ValueError, match='n_examples must be positive'):
        load_imagenet_tensors(root=tmp_path, n_examples=0, progress=False)
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
