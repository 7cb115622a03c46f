"""torch.hub entry points: ``torch.hub.load('<repo>', 'robust_resnet_a1', pretrained=False)``.

Every model robust-resnets registers with timm is an entry point with timm's keyword arguments
(``pretrained``, ``num_classes``, ``features_only``, ...). ``torch.hub.list`` shows only models.
A pretrained tag is chosen with ``pretrained_cfg``: ``torch.hub.load('<repo>', 'robust_resnet_a1',
pretrained=True, pretrained_cfg='cifar10_trades')`` loads ``robust_resnet_a1.cifar10_trades``.
"""
dependencies = ['torch', 'timm', 'huggingface_hub', 'safetensors']

import functools as _functools  # noqa: E402

import timm as _timm  # noqa: E402

import robust_resnets as _robust_resnets  # noqa: E402,F401  (registers the models)
from robust_resnets.models import list_models as _list_models  # noqa: E402


def _entrypoint(name):
    @_functools.wraps(_timm.models.model_entrypoint(name))
    def create(pretrained=False, **kwargs):
        return _timm.create_model(name, pretrained=pretrained, **kwargs)

    create.__name__ = name
    return create


for _name in _list_models():
    globals()[_name] = _entrypoint(_name)
del _name
