"""The package surface: light import, the CLI's models command, torch.hub entry points."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robust_resnets.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_import_stays_light():
    code = ('import sys, robust_resnets, timm; '
            'heavy = [m for m in ("robustbench", "autoattack", "robust_resnets.evaluation", '
            '"robust_resnets.training", "robust_resnets.data", "robust_resnets.attacks") if m in sys.modules]; '
            'print(heavy); assert timm.is_model("robust_resnet_a1")')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '[]', out.stdout


def test_cli_models_json(capsys):
    assert main(['models', 'wrn_a1', '--json']) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r['model'] for r in rows] == ['wrn_a1']
    assert rows[0]['params'] == 18707930 and 5.0e9 < rows[0]['macs'] < 5.1e9


def test_cli_models_table_and_bad_pattern(capsys):
    assert main(['models', 'robust_resnet_a*', '--no-macs']) == 0
    out = capsys.readouterr().out
    assert 'robust_resnet_a1' in out and '19.22M' in out
    assert main(['models', 'no_such_model*']) == 1
    assert "no registered model matches 'no_such_model*'" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, '-m', 'robust_resnets', '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and 'models' in out.stdout


def _hubconf():
    spec = importlib.util.spec_from_file_location('hubconf', ROOT / 'hubconf.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hub_lists_only_models():
    from robust_resnets.models import list_models

    hub = _hubconf()
    listed = [f for f in dir(hub) if callable(getattr(hub, f)) and not f.startswith('_')]  # torch.hub.list's rule
    assert listed == list_models()


def test_hub_load_local():
    model = torch.hub.load(str(ROOT), 'robust_resnet_a1', source='local', num_classes=3, depths=(1, 1, 1))
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_hub_load_from_github_style_zip(tmp_path):
    """torch.hub unpacks GitHub's zipball with zipfile, which writes the manifest_data symlink as a plain file."""
    import os
    import zipfile

    try:
        listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip('needs a git checkout of the project')
    archive = tmp_path / 'repo.zip'
    with zipfile.ZipFile(archive, 'w') as zf:
        for rel in listed:
            path = ROOT / rel
            if path.is_symlink():  # as GitHub stores it: the link target as the content, symlink mode bits
                info = zipfile.ZipInfo(f'repo-main/{rel}')
                info.external_attr = 0o120777 << 16
                zf.writestr(info, os.readlink(path))
            elif path.is_file():
                zf.write(path, f'repo-main/{rel}')
    extract = getattr(torch.hub, '_safe_extract_zip', None)
    with zipfile.ZipFile(archive) as zf:
        if extract is not None:
            extract(zf, str(tmp_path))
        else:
            zf.extractall(tmp_path)
    repo = tmp_path / 'repo-main'
    assert (repo / 'robust_resnets/weights/manifest_data').is_file()  # what torch.hub leaves
    code = ('import torch, timm; '
            f"m = torch.hub.load({str(repo)!r}, 'robust_resnet_a0', source='local', num_classes=3); "
            "import robust_resnets; print(robust_resnets.__file__); print(len(timm.list_models('robust_resnet_a0.*', include_tags=True)))")
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    file, tags = out.stdout.split()[-2:]
    assert Path(file).resolve().is_relative_to(repo.resolve()) and int(tags) >= 1
