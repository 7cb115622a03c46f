"""The model and the data of an evaluation, from names: what ``robust-resnets eval`` and the benchmarks load."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ['DATASETS', 'PixelInputModel', 'load_model', 'load_dataset', 'weights_entry', 'check_input_fits',
           'model_notes']

#: dataset -> number of classes
DATASETS = {'cifar10': 10, 'cifar100': 100, 'imagenet': 1000}


def weights_entry(name: str):
    """The weights manifest's entry for ``arch.tag``, or None (no tag, or a tag the manifest does not list)."""
    if '.' not in name:
        return None
    from robust_resnets.weights import get_manifest

    return get_manifest().get(name)


def exported_model(name: str) -> Optional[Tuple[str, Path, Optional[str]]]:
    """``(architecture, weights file, training dataset)`` of an exported model folder named as ``local-dir:PATH``
    or as a path (a training run, or any folder with timm's ``config.json`` and ``model.safetensors``); None
    for a model name (which wins over a folder of the same name).

    Raises:
        ValueError: The folder lacks either file or its config names no architecture.
    """
    import json

    import timm

    path = Path(name[len('local-dir:'):]) if name.startswith('local-dir:') else Path(name)
    if path.is_file() and not timm.is_model(name.partition('.')[0]):
        from robust_resnets.weights.pretrained import recorded_architecture

        recorded = recorded_architecture(path)
        folder = f"its folder (robust-resnets eval {path.parent}), or " if (path.parent / 'config.json').is_file() else ''
        raise ValueError(f"'{path}' is a weights file, not a model: evaluate {folder}name the architecture: "
                         f"robust-resnets eval {recorded.architecture if recorded else 'ARCH'} --checkpoint {path}")
    if not name.startswith('local-dir:') and (not path.is_dir() or timm.is_model(name.partition('.')[0])):
        return None  # a model name, even where a folder of that name exists (convert's --out ./TAG)
    config, weights = path / 'config.json', path / 'model.safetensors'
    if not (config.is_file() and weights.is_file()):
        raise ValueError(f"'{path}' is not an exported model: it needs config.json and model.safetensors (a "
                         f'training run has them once it finished; a stopped one: pass its last.pt as --checkpoint).')
    try:
        data = json.loads(config.read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
        raise ValueError(f"'{config}' is not readable JSON ({e}).") from None
    arch = data.get('architecture') if isinstance(data, dict) else None
    if not isinstance(arch, str):
        raise ValueError(f"'{config}' names no architecture; it is not timm's config.json of a model.")
    training = data.get('training') if isinstance(data.get('training'), dict) else {}
    return arch, weights, training.get('dataset')


def resolve_model_name(name: str, *, checkpoint: Optional[str] = None, random_init: bool = False) -> str:
    """The name to evaluate: an untagged architecture whose published weights are to be loaded becomes its
    default tag, as ``timm.create_model(arch, pretrained=True)`` resolves it; any other name is kept.

    Raises:
        ValueError: The architecture has tags, but none for its plain arguments (name one).
    """
    if '.' in name or checkpoint is not None or random_init:
        return name
    from robust_resnets.weights.pretrained import default_entry

    try:
        entry = default_entry(name)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    return entry.name if entry is not None else name


class PixelInputModel(nn.Module):
    """A timm model whose weights expect standardised inputs, made to take [0, 1] pixels like this package's models.

    ``normalize`` (an :class:`~robust_resnets.models.layers.InputNormalize`) standardises the pixels with the
    mean and std of the model's pretrained cfg, then ``model`` runs, so that attacks perturb pixels and eps is
    in pixel units. ``pretrained_cfg`` is the model's with mean 0 and std 1, as this package's models have
    them; ``forward_features`` and ``forward_intermediates`` standardise first too; any other attribute
    (``num_classes``, ``forward_head``, ``get_classifier``, ...) is the model's.
    """

    def __init__(self, model: nn.Module, *, mean: Sequence[float], std: Sequence[float]) -> None:
        """
        Args:
            model: The timm model, taking standardised inputs.
            mean: Per-channel mean its weights were trained with.
            std: Per-channel standard deviation its weights were trained with.
        """
        from robust_resnets.models.layers import InputNormalize

        super().__init__()
        self.normalize = InputNormalize(tuple(mean), tuple(std))
        self.model = model
        cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
        self.pretrained_cfg = self.default_cfg = {**cfg, 'mean': (0.0,) * len(mean), 'std': (1.0,) * len(std)}

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.normalize(x))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.model.forward_features(self.normalize(x))

    def forward_intermediates(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.model.forward_intermediates(self.normalize(x), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__['_modules'].get('model')
            if model is None:
                raise
            return getattr(model, name)

    def note(self, name: str) -> str:
        """What the wrapping did, for a results file."""
        mean = tuple(round(v, 4) for v in self.normalize.mean.flatten().tolist())
        std = tuple(round(v, 4) for v in self.normalize.std.flatten().tolist())
        return (f"{name} is a timm model whose pretrained cfg standardises inputs with mean={mean}, std={std}: it "
                f"was evaluated with that standardisation in front (InputNormalize), so that it takes [0, 1] pixels "
                f"and eps is in pixel units.")


def _pixel_input(model: nn.Module) -> nn.Module:
    """``model``, or a :class:`PixelInputModel` around it when it has no standardisation inside but its
    pretrained cfg gives a mean and std other than 0 and 1 (a stock timm model)."""
    from robust_resnets.models.layers import InputNormalize

    if any(isinstance(m, InputNormalize) for m in model.modules()):
        return model
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    mean, std = cfg.get('mean'), cfg.get('std')
    if mean is None or std is None:
        return model
    mean, std = (tuple(v) if isinstance(v, (list, tuple)) else (v,) for v in (mean, std))
    if all(m == 0 for m in mean) and all(s == 1 for s in std):
        return model
    return PixelInputModel(model, mean=mean, std=std)


def model_notes(model: nn.Module, *, name: str) -> List[str]:
    """Notes for a results file on how :func:`load_model` adapted ``model`` (empty when it did not)."""
    return [model.note(name)] if isinstance(model, PixelInputModel) else []


def load_model(name: str, *, dataset: str, checkpoint: Union[str, Path, None] = None,
               checkpoint_key: Optional[str] = None, random_init: bool = False,
               device: Union[str, torch.device] = 'cpu') -> nn.Module:
    """Builds a timm model in eval mode with its weights, taking [0, 1] pixels.

    This package's models standardise their input inside (their pretrained cfgs have mean 0 and std 1). A stock
    timm model (e.g. ``resnet50.a1_in1k``) does not: with its published weights, or ``random_init``, it is
    wrapped in a :class:`PixelInputModel` that standardises with its pretrained cfg's mean and std
    (:func:`model_notes` says so for the results file). A ``checkpoint`` is fed [0, 1] pixels as it is, the
    way this package's trainer trains any timm model.

    Args:
        name: timm model name, optionally with a pretrained tag (``robust_resnet_a1.cifar10_trades``).
        dataset: Dataset it is evaluated on; sets the classifier size of a model built without a tag.
        checkpoint: Local safetensors/.pt file (ours or an author's layout, mapped by the family's
            ``checkpoint_filter_fn``), instead of the published weights.
        checkpoint_key: The entry of a training-state ``checkpoint`` to load (e.g. ``'state_dict_ema'``);
            needed when the file holds both the trained weights and their EMA.
        random_init: Keep the random initialisation (for testing a pipeline).
        device: Where the model goes.

    Raises:
        ValueError: Unknown model or dataset; no weights to load and ``random_init`` not set.
        RuntimeError: The weights do not fit the model.
    """
    import timm

    import robust_resnets  # noqa: F401  (registers the models)

    arch = name.split('.', 1)[0]
    if not timm.is_model(arch):
        raise ValueError(f"Unknown model '{arch}'. `robust-resnets models` lists ours; any timm model name works too.")
    entry = weights_entry(name)
    if entry is not None and entry.dataset not in DATASETS:
        raise ValueError(f'{name} was trained on {entry.dataset}, and `robust-resnets eval` has no {entry.dataset} '
                         f'loader; evaluate it with robust_resnets.evaluation.evaluate(model, images, labels, ...) '
                         f'on {entry.dataset} test tensors.')
    if entry is not None and entry.dataset != dataset:
        raise ValueError(f'{name} was trained on {entry.dataset}, so {dataset} labels would not score it. Pass '
                         f'--dataset {entry.dataset}.')
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset '{dataset}'; use one of {sorted(DATASETS)}.")
    if entry is not None:
        from robust_resnets.weights import register_manifest

        register_manifest()  # makes the manifest's tags known to timm
    kwargs: Dict[str, Any] = dict(entry.model_args) if entry is not None else {}
    if checkpoint is not None and entry is None:
        kwargs = _beside_model_args(Path(checkpoint), arch)
    if checkpoint is not None or random_init:
        num_classes = entry.num_classes if entry is not None else DATASETS[dataset]
        model = timm.create_model(name if entry is not None else arch, pretrained=False, num_classes=num_classes,
                                  **kwargs)
        if checkpoint is not None:
            _load_checkpoint(model, arch, Path(checkpoint), key=checkpoint_key)
        else:
            model = _pixel_input(model)
    else:
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError:  # timm: invalid pretrained tag
            raise ValueError(_unknown_tag_message(name)) from None
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise ValueError(f"'{name}' has no pretrained weights to load. Name a published tag, pass "
                             f"--checkpoint FILE, or --random-init to test the pipeline.")
        model = _pixel_input(timm.create_model(name, pretrained=True, **kwargs))
    if model.num_classes != DATASETS[dataset]:
        raise ValueError(f'{name} has {model.num_classes} outputs but {dataset} has {DATASETS[dataset]} classes; '
                         f'check --dataset or the tag.')
    return model.to(device).eval()


def _unknown_tag_message(name: str) -> str:
    import difflib

    import timm

    arch, _, tag = name.partition('.')
    tags = sorted(t.partition('.')[2] for t in timm.list_models(f'{arch}.*', include_tags=True))
    close = difflib.get_close_matches(tag, tags, n=1)
    hint = f" Did you mean '{arch}.{close[0]}'?" if close else ''
    return (f"'{tag}' is not a pretrained tag of {arch}.{hint} Its tags: {', '.join(tags) or 'none'} "
            f"(timm.list_models('{arch}.*', include_tags=True)).")


def _beside_model_args(checkpoint: Path, arch: str) -> Dict[str, Any]:
    """The model arguments recorded with ``checkpoint`` (its safetensors metadata, or a training run's
    ``config.json`` or ``train_config.yaml`` beside it); none when nothing is recorded.

    Raises:
        ValueError: The record names another architecture than ``arch``.
    """
    from robust_resnets.weights.pretrained import recorded_architecture

    recorded = recorded_architecture(checkpoint)
    if recorded is None:
        return {}
    if recorded.architecture != arch:
        raise ValueError(f"{checkpoint} holds weights for '{recorded.architecture}' (says {recorded.source}), not "
                         f"'{arch}'; evaluate it with: robust-resnets eval {recorded.architecture} --checkpoint "
                         f"{checkpoint}")
    return recorded.model_args


def _load_checkpoint(model: nn.Module, arch: str, path: Path, *, key: Optional[str] = None) -> None:
    from robust_resnets.weights.convert import family_module, load_original_checkpoint, state_dict_mismatch

    raw = load_original_checkpoint(path, key=key)
    try:
        filter_fn = family_module(arch).checkpoint_filter_fn
    except ValueError:  # a plain timm model: its own state dict layout
        filter_fn = None
    state_dict = filter_fn(raw, model) if filter_fn is not None else raw.get('state_dict', raw)
    mismatch = state_dict_mismatch(state_dict, model)
    classes = _other_head_classes(state_dict, model) if mismatch else None
    if classes is not None:
        fits = [d for d, n in DATASETS.items() if n == classes]
        fix = f'pass --dataset {fits[0]}' if fits else f'evaluate it in Python on a {classes}-class dataset'
        raise RuntimeError(f'{path} has a {classes}-class head, but {arch} was built with {model.num_classes} classes '
                           f'(the dataset\'s); {fix}.')
    if mismatch:
        raise RuntimeError(f'{path} does not fit {arch} as built here: {mismatch}. Check the model name, and its '
                           f'arguments: a training run\'s config.json or train_config.yaml beside the checkpoint '
                           f'gives them.')
    model.load_state_dict(state_dict)


def _other_head_classes(state_dict: Dict[str, Tensor], model: nn.Module) -> Optional[int]:
    """The class count of a checkpoint that fits ``model`` but for its classifier's class count, else None."""
    head = getattr(model, 'pretrained_cfg', {}).get('classifier')
    expected = model.state_dict()
    weight = state_dict.get(f'{head}.weight')
    if not head or weight is None or set(state_dict) != set(expected):
        return None
    if weight.shape[0] == expected[f'{head}.weight'].shape[0]:
        return None
    head_keys = {f'{head}.weight', f'{head}.bias'}
    fits = all(tuple(v.shape) == tuple(expected[k].shape) for k, v in state_dict.items() if k not in head_keys)
    return int(weight.shape[0]) if fits else None


def check_input_fits(model: nn.Module, images: Tensor, *, name: str, dataset: str) -> None:
    """Runs one image through ``model``, so that a model built for other inputs fails with a plain message.

    Raises:
        ValueError: The forward pass fails or does not give one score per class.
    """
    x = images[:1].float().div(255).to(next(model.parameters()).device)
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, AssertionError, ValueError) as e:
        expected = getattr(model, 'pretrained_cfg', {}).get('input_size')
        raise ValueError(f"{name} does not take {dataset} images ({tuple(x.shape[1:])}): {str(e).splitlines()[0]}. "
                         f"It expects inputs of {tuple(expected) if expected else 'another size'}; evaluate it on "
                         f"the dataset it was built for (--dataset).") from None
    if tuple(out.shape) != (1, DATASETS[dataset]):
        raise ValueError(f'{name} gives outputs of shape {tuple(out.shape[1:])} on {dataset} images, not '
                         f'{DATASETS[dataset]} class scores.')


def load_dataset(dataset: str, *, data_dir: Union[str, Path], n_examples: Optional[int] = None,
                 model: Optional[nn.Module] = None, imagenet_subset: str = 'robustbench',
                 resolution: Optional[int] = None, download: bool = False,
                 progress: bool = True) -> Tuple[Tensor, Tensor, Optional[Dict[str, Any]]]:
    """Returns ``(uint8 images, labels, preprocessing settings or None)``: the first ``n_examples`` test images.

    ImageNet images are preprocessed as the model's pretrained cfg says (input size, crop_pct,
    interpolation), RobustBench's way (without a cfg: its default ``Res256Crop224``); ``resolution``
    overrides the input size. ``progress`` shows a bar while images are decoded.
    """
    from robust_resnets.data import load_cifar_tensors, load_imagenet_tensors

    if n_examples is not None and n_examples < 1:
        raise ValueError(f'n_examples must be positive, got {n_examples}.')
    if dataset in ('cifar10', 'cifar100'):
        images, labels = load_cifar_tensors(root=data_dir, dataset=dataset, split='test', download=download,
                                            progress=progress)
        return images[:n_examples], labels[:n_examples], None
    if dataset == 'imagenet':
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        prep = {'resolution': int(resolution or cfg.get('input_size', (3, 224, 224))[-1]),
                'crop_pct': float(cfg.get('crop_pct', 0.875)), 'interpolation': str(cfg.get('interpolation', 'bilinear')),
                'subset': imagenet_subset}
        images, labels = load_imagenet_tensors(root=data_dir, n_examples=n_examples or 5000, progress=progress, **prep)
        return images, labels, prep
    raise ValueError(f"Unknown dataset '{dataset}'; use one of {sorted(DATASETS)}.")
