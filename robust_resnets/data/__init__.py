"""Evaluation data as uint8 tensors: CIFAR-10/100, ImageFolders and RobustBench's ImageNet subset."""
from .cifar import CIFAR_DATASETS, load_cifar_tensors
from .folder import load_image_folder
from .imagenet import imagenet_subset_ids, imagenet_transform, imagenet_wnids, load_imagenet_tensors

__all__ = [
    'CIFAR_DATASETS', 'load_cifar_tensors', 'load_image_folder', 'imagenet_subset_ids', 'imagenet_transform',
    'imagenet_wnids', 'load_imagenet_tensors',
]
