"""``python -m benchmarks.gpu_session COMMAND``: the arithmetic and bookkeeping behind ``benchmarks/gpu_session.sh``.

* ``environment``: device, GPU, library versions, date and command as JSON (the setup stage's record).
* ``probe``: training images/s of a recipe for each model, measured with the real trainer on random data.
* ``plan``: from the probes, run the two trainings together or one after the other, and how many epochs fit
  a time budget.
* ``max-steps``: the absolute ``run.max_steps`` that lets a run stop cleanly within a time window.
* ``status``: where each training run stands (step, epoch, last held-out accuracies, finished or not).
* ``best``: the model with the highest worst-case robust accuracy among ``robust-resnets eval`` results.
* ``annotate``: adds keys (the environment, a note) to a result JSON, atomically.
* ``summary``: a short plain-text table of every result the session has so far.
* ``slim-wheel``: rewrites a wheel without some data files (pyautoattack ships a 45 MB example model).

Light imports only at module level: the shell calls it often.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

# --- small utilities -----------------------------------------------------------------------------------------
def write_json(path: Path, payload: Dict[str, Any]) -> None:
    """Writes ``payload`` to ``path`` atomically (the evaluation's results writer, imported only when writing)."""
    from robust_resnets.evaluation.results import write_json as write_atomically

    write_atomically(payload, path)


def read_json(path: Path) -> Dict[str, Any]:
    """Reads a JSON object, with an error that names the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"'{path}' does not exist; run the stage that writes it first.") from None
    except ValueError as e:
        raise ValueError(f"'{path}' is not valid JSON ({e}); delete it and run its stage again.") from None
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' holds no JSON object; delete it and run its stage again.")
    return data


def environment(command: Optional[str] = None) -> Dict[str, Any]:
    """The speed benchmarks' environment record (:func:`benchmarks.speed.environment`) of this process's device,
    under the session's command."""
    import torch

    from benchmarks.speed import environment as speed_environment

    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return speed_environment(device, command=command or os.environ.get('GPU_SESSION_COMMAND') or ' '.join(sys.argv))


def _config_dict(recipe: str, overrides: Sequence[str]) -> Dict[str, Any]:
    from robust_resnets.training.config import config_to_dict, load_config

    return config_to_dict(load_config(recipe, overrides=list(overrides)))


def _model_overrides(model: str, model_kwargs: str) -> List[str]:
    return [f'model.name={model}', f'model.kwargs={model_kwargs}']


# --- probe and plan ------------------------------------------------------------------------------------------
def probe(models: Sequence[str], *, recipe: str, overrides: Sequence[str], model_kwargs: str,
          steps: int) -> Dict[str, Any]:
    """Training images/s of ``recipe`` (with ``overrides``) for each model, one after the other in this process."""
    from benchmarks.speed import trainer_img_s

    rows = {}
    for model in models:
        config = _config_dict(recipe, [*overrides, *_model_overrides(model, model_kwargs)])
        config['run']['progress'] = False
        rows[model] = {'img_s': trainer_img_s(config, steps=steps), 'batch_size': config['run']['batch_size'],
                       'steps_per_epoch': steps}
        print(f"probe {model}: {rows[model]['img_s']:.1f} img/s", flush=True)
    return {'recipe': recipe, 'overrides': list(overrides), 'model_kwargs': json.loads(model_kwargs), 'rows': rows}


def steps_per_epoch(recipe: str, overrides: Sequence[str]) -> Dict[str, int]:
    """The run's training-set size and steps an epoch, from the real (cached) data the config names."""
    from robust_resnets.training.config import load_config
    from robust_resnets.training.data import BatchPlan, load_training_data

    cfg = load_config(recipe, overrides=list(overrides))
    data = load_training_data(cfg.data, cfg.eval)
    n_train = int(data.train_images.shape[0])
    plan = BatchPlan(n_train=n_train, n_generated=0, batch_size=cfg.run.batch_size, generated_fraction=0.0,
                     seed=cfg.run.seed, crop_padding=cfg.data.crop_padding, flip=cfg.data.flip,
                     rotation=cfg.data.rotation)
    return {'n_train': n_train, 'batch_size': cfg.run.batch_size, 'steps_per_epoch': plan.steps_per_epoch}


def make_plan(*, alone: Dict[str, float], together: Dict[str, float], n_train: int, batch_size: int,
              spe: int, budget_s: float, overhead_s: float, max_epochs: int, mode: str = 'auto') -> Dict[str, Any]:
    """Chooses concurrent or sequential training and the epoch count that fits ``budget_s``.

    Per epoch, one after the other costs the sum of both models' epoch times alone; together costs the
    longer of the two epoch times measured while both ran (the slower run speeds up once the faster one
    ends; the probes' epochs are sized to outlast the processes' start-up skew, so they overlap). The cheaper way wins; the epochs are as many as fit ``budget_s - overhead_s``
    (at least 1, at most ``max_epochs``). ``mode`` 'concurrent' or 'sequential' overrides the choice.
    """
    if mode not in ('auto', 'concurrent', 'sequential'):
        raise ValueError(f"mode must be 'auto', 'concurrent' or 'sequential', got '{mode}'.")
    if set(alone) != set(together) or not alone:
        raise ValueError(f'The probes name different models: alone {sorted(alone)}, together {sorted(together)}.')
    images = spe * batch_size
    seq_epoch_s = sum(images / r for r in alone.values())
    con_epoch_s = max(images / r for r in together.values())
    faster = 'concurrent' if con_epoch_s < seq_epoch_s else 'sequential'
    mode = faster if mode == 'auto' else mode
    epoch_s = con_epoch_s if mode == 'concurrent' else seq_epoch_s
    fit = math.floor(max(budget_s - overhead_s, 0) / epoch_s)
    epochs = max(1, min(max_epochs, fit))
    return {
        'mode': mode, 'epochs': epochs, 'epochs_that_fit': fit, 'max_epochs': max_epochs,
        'n_train': n_train, 'batch_size': batch_size, 'steps_per_epoch': spe, 'total_steps': epochs * spe,
        'budget_s': budget_s, 'overhead_s': overhead_s,
        'sequential_epoch_s': seq_epoch_s, 'concurrent_epoch_s': con_epoch_s,
        'predicted_train_s': epochs * epoch_s + overhead_s,
        'img_s': {'alone': alone, 'together': together},
        'why': (f"both models' epochs take {seq_epoch_s:.1f} s one after the other and {con_epoch_s:.1f} s "
                f"run together on the one GPU: {faster} is faster{'' if mode == faster else f', {mode} was asked for'}; {fit} epochs fit {budget_s:g} s "
                f"(less {overhead_s:g} s start-up), capped at {max_epochs}"),
    }


def run_step(run_dir: Path) -> int:
    """The optimizer step a run would resume from (its ``last.pt``), 0 for a run not started."""
    last = run_dir / 'last.pt'
    if not last.is_file():
        return 0
    import torch

    # mmap needs a str filename before torch 2.2
    return int(torch.load(str(last), map_location='cpu', weights_only=False, mmap=True)['step'])


def max_steps(*, run_dir: Path, img_s: float, seconds: float, batch_size: int, total_steps: int,
              cap: Optional[int] = None, safety: float = 0.9) -> int:
    """``run.max_steps`` (absolute) that ends a run within ``seconds`` at ``img_s`` (with a safety factor), at
    least one step and at most ``cap`` steps beyond where the run stands."""
    step = run_step(run_dir)
    fits = max(math.floor(safety * max(seconds, 0) * img_s / batch_size), 1)
    return min(total_steps, step + (fits if cap is None else min(fits, cap)))


# --- after training ------------------------------------------------------------------------------------------
def run_status(run_dir: Path) -> Dict[str, Any]:
    """Where one run stands, from its metrics: finished, step, epoch and the last held-out evaluation."""
    status: Dict[str, Any] = {'run_dir': str(run_dir), 'finished': (run_dir / 'model.safetensors').is_file(),
                              'started': (run_dir / 'train_config.yaml').is_file()}
    metrics = run_dir / 'metrics.jsonl'
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
        if metrics.is_file() else []
    epochs = [r for r in records if 'epoch_time_s' in r]
    start = next((r for r in records if r.get('event') == 'start'), {})
    status.update(total_steps=start.get('total_steps'), steps_per_epoch=start.get('steps_per_epoch'),
                  params=start.get('params'), step=run_step(run_dir) if not status['finished'] else start.get('total_steps'),
                  epochs_done=epochs[-1]['epoch'] if epochs else 0,
                  train_seconds=round(sum(r['epoch_time_s'] for r in epochs), 1),
                  launches=sum(1 for r in records if r.get('event') in ('start', 'resume')))
    evals = [r for r in epochs if 'val_clean_acc' in r]
    if evals:
        status['last_eval'] = {k: v for k, v in evals[-1].items() if k.startswith('val_') or k == 'epoch'}
    if epochs:
        status['last_epoch'] = {k: epochs[-1][k] for k in ('epoch', 'train_loss', 'train_adv_acc', 'lr') if k in epochs[-1]}
        status['img_s_last_epoch'] = (start.get('steps_per_epoch') or 0) * _batch_size(run_dir) / epochs[-1]['epoch_time_s'] \
            if epochs[-1]['epoch_time_s'] else None
    return status


def _batch_size(run_dir: Path) -> int:
    import yaml

    config = run_dir / 'train_config.yaml'
    return int(yaml.safe_load(config.read_text())['run']['batch_size']) if config.is_file() else 0


def best_model(evals: Sequence[Path]) -> str:
    """The model of the ``robust-resnets eval`` result with the highest worst-case robust accuracy."""
    scored = []
    for path in evals:
        data = read_json(path)
        acc = data.get('robust_accuracy')
        if acc is None:
            raise ValueError(f"'{path}' has no worst-case robust accuracy (no attack was run); evaluate with "
                             f"attacks, e.g. --attacks clean,pgd20.")
        scored.append((acc, data['model']['name'].split('.')[0]))
    if not scored:
        raise ValueError('No evaluation results given: evaluate the trained models first.')
    return max(scored, key=lambda t: t[0])[1]


def slim_wheel(wheel: Path, patterns: Sequence[str]) -> List[str]:
    """Rewrites ``wheel`` (atomically) without the members matching ``patterns`` (fnmatch), and without their
    RECORD lines; returns the names dropped."""
    import fnmatch
    import zipfile

    tmp = wheel.with_name(f'.{wheel.name}.tmp')
    dropped = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, 'w', zipfile.ZIP_DEFLATED) as dst:
        names = [i.filename for i in src.infolist()]
        dropped = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info)
            if info.filename.endswith('.dist-info/RECORD'):
                data = ''.join(line for line in data.decode().splitlines(keepends=True)
                               if line.split(',', 1)[0] not in dropped).encode()
            dst.writestr(info, data)
    os.replace(tmp, wheel)
    return dropped


# --- summary -------------------------------------------------------------------------------------------------
def _pct(x: Optional[float]) -> str:
    return '   -  ' if x is None else f'{100 * x:6.2f}'


def summary(results: Path) -> str:
    """A short plain-text table of what ``results`` holds (the last lines a session sees)."""
    lines = []
    setup = results / 'setup.json'
    if setup.is_file():
        env = read_json(setup)['environment']
        v = env['versions']
        lines.append(f"device {env.get('gpu') or env.get('cpu')}  torch {env['torch']} (CUDA {env.get('cuda')})  "
                     f"timm {v['timm']}  robustbench {v['robustbench']}")
    plan = results / 'train_plan.json'
    if plan.is_file():
        p = read_json(plan)
        lines.append(f"train plan: {p['mode']}, {p['epochs']} epochs ({p['epochs_that_fit']} fit), "
                     f"predicted {p['predicted_train_s']:.0f} s; img/s alone "
                     + ', '.join(f'{m} {r:.0f}' for m, r in p['img_s']['alone'].items()))
    status = results / 'train_status.json'
    if status.is_file():
        for model, s in read_json(status)['runs'].items():
            ev = s.get('last_eval', {})
            lines.append(f"  {model:18s} {'finished' if s['finished'] else 'unfinished'} step {s['step']}/"
                         f"{s['total_steps']} epoch {s['epochs_done']}  held-out clean {_pct(ev.get('val_clean_acc'))}"
                         f" pgd {_pct(ev.get('val_pgd_acc'))}  {s['train_seconds']:.0f} s")
    for path in sorted(p for p in results.glob('eval_*.json') if not p.name.endswith('.state.json')):
        d = read_json(path)
        accs = '  '.join(f"{k} {_pct(a['accuracy'])}" for k, a in d['attacks'].items())
        lines.append(f"eval {d['model']['name']:18s} n={d['data']['n_examples']}  {accs}  worst {_pct(d['robust_accuracy'])}")
    precision = results / 'precision.json'
    if precision.is_file():
        d = read_json(precision)
        lines.append(f"precision ({d.get('model')}, n={d['n_examples']}): "
                     + '  '.join(f"{k} fp32 {_pct(d['fp32'][k])} bf16 {_pct(d['bf16_channels_last'][k])}" for k in d['fp32']))
    aa = results / 'autoattack.json'
    if aa.is_file():
        d = read_json(aa)
        if 'skipped' in d:
            lines.append(f"autoattack comparison skipped: {d['skipped']}")
        else:
            lines.append(f"autoattack ({d.get('model')}, n={d['n_examples']}): ours {d['ours']['seconds']:.1f} s "
                         f"{_pct(d['ours']['autoattack'])}, robustbench {d['robustbench']['seconds']:.1f} s "
                         f"{_pct(d['robustbench']['autoattack'])}, x{d['speedup']:.2f}")
    matmul = results / 'speed_matmul.json'
    if matmul.is_file():
        lines.append(f"bf16 matmul {read_json(matmul)['bf16_matmul_tflops']:.3g} TFLOP/s")
    for path in sorted(results.glob('speed_train*.json')):
        for r in read_json(path)['rows']:
            lines.append(f"train speed {r['model']:18s} batch {r['batch_size']:4d}: plain {r['plain_fp32_img_s']:8.1f} "
                         f"ours {r['ours_img_s']:8.1f} img/s x{r['speedup']:.2f}")
    for path in sorted(results.glob('speed_throughput*.json')):
        rows = read_json(path)['rows']
        lines.append(f"throughput ({path.stem}): {len(rows)} models; "
                     + ', '.join(f"{r['model']} {r['fp32_img_s']:.0f}/{r['bf16_cl_img_s']:.0f}" for r in rows[:5])
                     + (' ...' if len(rows) > 5 else '') + ' (fp32/bf16 img/s)')
    return '\n'.join(lines) if lines else f'(no results in {results} yet)'


# --- command line --------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.gpu_session', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='what', required=True)
    p = sub.add_parser('environment')
    p.add_argument('--out', required=True)
    p.add_argument('--data', default=None, help='CIFAR-10 source: decode (or read the cache of) both splits, timed')
    p = sub.add_parser('probe')
    p.add_argument('--models', required=True, help='comma-separated model names')
    p.add_argument('--recipe', required=True)
    p.add_argument('--set', dest='overrides', action='append', default=[])
    p.add_argument('--model-kwargs', default='{}')
    p.add_argument('--steps', type=int, default=20, help='steps an epoch of the probe (three epochs; two timed)')
    p.add_argument('--out', required=True)
    p = sub.add_parser('plan')
    p.add_argument('--alone', required=True, help='probe JSON of the models one after the other')
    p.add_argument('--together', required=True, nargs='+', help='probe JSONs of the models run at once')
    p.add_argument('--recipe', required=True)
    p.add_argument('--set', dest='overrides', action='append', default=[])
    p.add_argument('--budget-s', type=float, required=True)
    p.add_argument('--overhead-s', type=float, default=60.0)
    p.add_argument('--max-epochs', type=int, default=30)
    p.add_argument('--mode', default='auto', choices=('auto', 'concurrent', 'sequential'))
    p.add_argument('--out', required=True)
    p = sub.add_parser('max-steps')
    p.add_argument('--run', required=True)
    p.add_argument('--plan', required=True)
    p.add_argument('--model', required=True)
    p.add_argument('--seconds', type=float, required=True)
    p.add_argument('--checkpoint-s', type=float, default=60.0, help='also print checkpoint_every for this interval')
    p.add_argument('--cap', type=int, default=None, help='at most this many new steps (smoke tests of resuming)')
    p = sub.add_parser('status')
    p.add_argument('--runs', required=True)
    p.add_argument('--models', required=True)
    p.add_argument('--out', required=True)
    p = sub.add_parser('best')
    p.add_argument('evals', nargs='+')
    p = sub.add_parser('annotate')
    p.add_argument('file')
    p.add_argument('--environment', action='store_true', help='add the environment record')
    p.add_argument('--set', dest='pairs', action='append', default=[], metavar='KEY=VALUE')
    p = sub.add_parser('get')
    p.add_argument('file')
    p.add_argument('key', help='dotted key')
    p = sub.add_parser('summary')
    p.add_argument('--results', required=True)
    p = sub.add_parser('slim-wheel')
    p.add_argument('wheel')
    p.add_argument('--drop', action='append', required=True, metavar='GLOB')
    args = parser.parse_args(argv)

    if args.what == 'environment':
        payload: Dict[str, Any] = {'environment': environment()}
        if args.data:
            import time

            from robust_resnets.data.cifar import load_cifar_tensors

            for split in ('train', 'test'):
                start = time.perf_counter()
                images, _ = load_cifar_tensors(root=args.data, dataset='cifar10', split=split)
                payload[f'data_{split}'] = {'images': int(images.shape[0]), 'seconds': round(time.perf_counter() - start, 2)}
        write_json(Path(args.out), payload)
    elif args.what == 'probe':
        payload = probe(args.models.split(','), recipe=args.recipe, overrides=args.overrides,
                        model_kwargs=args.model_kwargs, steps=args.steps)
        write_json(Path(args.out), {'environment': environment(), **payload})
    elif args.what == 'plan':
        alone = {m: r['img_s'] for m, r in read_json(Path(args.alone))['rows'].items()}
        together = {m: r['img_s'] for path in args.together for m, r in read_json(Path(path))['rows'].items()}
        size = steps_per_epoch(args.recipe, args.overrides)
        plan = make_plan(alone=alone, together=together, n_train=size['n_train'], batch_size=size['batch_size'],
                         spe=size['steps_per_epoch'], budget_s=args.budget_s, overhead_s=args.overhead_s,
                         max_epochs=args.max_epochs, mode=args.mode)
        write_json(Path(args.out), {'environment': environment(), 'recipe': args.recipe, 'overrides': args.overrides,
                                    **plan})
        print(f"plan: {plan['why']}")
    elif args.what == 'max-steps':
        plan = read_json(Path(args.plan))
        img_s = plan['img_s']['together' if plan['mode'] == 'concurrent' else 'alone'][args.model]
        steps = max_steps(run_dir=Path(args.run), img_s=img_s, seconds=args.seconds, batch_size=plan['batch_size'],
                          total_steps=plan['total_steps'], cap=args.cap)
        print(steps, max(1, math.floor(args.checkpoint_s * img_s / plan['batch_size'])))
    elif args.what == 'status':
        runs = {m: run_status(Path(args.runs) / m) for m in args.models.split(',')}
        write_json(Path(args.out), {'environment': environment(), 'runs': runs})
    elif args.what == 'best':
        print(best_model([Path(p) for p in args.evals]))
    elif args.what == 'annotate':
        data = read_json(Path(args.file))
        if args.environment:
            data['environment'] = environment()
        for pair in args.pairs:
            key, sep, value = pair.partition('=')
            if not sep:
                raise SystemExit(f"annotate --set '{pair}': expected KEY=VALUE.")
            data[key] = value
        write_json(Path(args.file), data)
    elif args.what == 'get':
        value: Any = read_json(Path(args.file))
        for part in args.key.split('.'):
            value = value[part]
        print(value if not isinstance(value, (dict, list)) else json.dumps(value))
    elif args.what == 'slim-wheel':
        print('dropped from', Path(args.wheel).name + ':', ' '.join(slim_wheel(Path(args.wheel), args.drop)) or 'nothing')
    else:
        print(summary(Path(args.results)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
