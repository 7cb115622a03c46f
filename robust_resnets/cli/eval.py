"""``robust-resnets eval``: clean and adversarial accuracy of a model, printed and written as JSON."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'eval', help='evaluate clean and adversarial accuracy (PGD, CW, AutoAttack)',
        description='Evaluate a model under attacks, RobustBench-style: clean accuracy, each attack, and the '
                    'per-example worst case. Attacks: clean, fgsm, pgd<K>[r<R>], cw<K>[r<R>], aa, aa-plus, '
                    'aa-rand, aa:<attack>+<attack> (the named AutoAttack attacks with standard\'s settings, e.g. '
                    'aa:apgd-ce+apgd-t).')
    parser.add_argument('model', help='model name with optional tag (robust_resnet_a1.cifar10_trades), any timm '
                                      'model name (with --checkpoint or --random-init), or an exported model folder '
                                      '(a finished training run; also as local-dir:PATH)')
    parser.add_argument('--dataset', default=None, choices=('cifar10', 'cifar100', 'imagenet'),
                        help="default: the tag's dataset, else cifar10")
    parser.add_argument('--attacks', default='clean,pgd20,cw40,aa', help='comma-separated (default: %(default)s)')
    parser.add_argument('--eps', default=None, help="threat model radius, e.g. 8/255 (default: the tag's for its norm, "
                                                    "else RobustBench's: CIFAR Linf 8/255, L2 0.5, L1 12; ImageNet "
                                                    'Linf 4/255)')
    parser.add_argument('--norm', default=None, choices=('Linf', 'L2', 'L1'), help='default Linf or the tag\'s')
    parser.add_argument('--step-size', default=None, help='PGD/CW step, in pixel units like --eps (default eps/10 '
                                                          'from 20 steps on, i.e. 0.8/255 at 8/255; else 2 * eps / '
                                                          'steps)')
    parser.add_argument('--n-examples', type=int, default=None,
                        help='first N test images (default: all; 5000 for ImageNet)')
    parser.add_argument('--data-dir', default='./data', help='dataset folder or archive (default: %(default)s)')
    parser.add_argument('--download', action='store_true', help='let torchvision download CIFAR if missing')
    parser.add_argument('--imagenet-subset', default='robustbench', choices=('robustbench', 'all'),
                        help="ImageNet: RobustBench's 5,000 images, or all images found")
    parser.add_argument('--checkpoint', default=None, help='local .safetensors/.pt weights instead of the published')
    parser.add_argument('--key', default=None, help='with --checkpoint: the entry of a training-state dict to load '
                                                   "(a trainer's last.pt: state_dict_ema or model); needed when the "
                                                   'file holds both the trained weights and their EMA')
    parser.add_argument('--random-init', action='store_true', help='evaluate the randomly initialised model (tests)')
    parser.add_argument('--robustbench-id', default=None, help="RobustBench's name for the model, for its reported "
                                                                'numbers (found automatically for known models)')
    parser.add_argument('--batch-size', type=int, default=None, help='default: the largest that fits the GPU')
    parser.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    parser.add_argument('--seed', type=int, default=0, help='seed of the attacks and of --random-init '
                                                            '(0 to 2**63 - 1)')
    parser.add_argument('--state', default=None, help='progress file to resume an interrupted run '
                                                      '(default: OUT.state.json when --out is given)')
    parser.add_argument('--out', default=None, help='results JSON to write (atomically)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --out file')
    parser.add_argument('--allow-train-mode', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--allow-randomized', action='store_true', help='evaluate a randomised model anyway')
    parser.add_argument('--no-masking-check', action='store_true', help='skip the gradient-masking checks')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    parser.set_defaults(func=run)


def format_table(data: dict) -> str:
    """A plain-text table of a results dict: one line per attack, then the worst case."""
    lines = [f"{data['model']['name']} on {data['data']['dataset']} ({data['data']['n_examples']} examples), "
             f"{data['threat_model']['norm']} eps={data['threat_model']['eps_text']}",
             f"{'attack':24s} {'accuracy':>9s} {'seconds':>9s}"]
    for name, a in data['attacks'].items():
        lines.append(f"{name:24s} {100 * a['accuracy']:8.2f}% {a['seconds']:9.1f}")
    if data['robust_accuracy'] is not None:
        lines.append(f"{'worst case':24s} {100 * data['robust_accuracy']:8.2f}%")
    reported = data.get('robustbench_reported')
    if reported:
        lines.append(f"RobustBench ({data['model']['robustbench_id']}): clean {reported.get('clean_acc')}%, "
                     f"AutoAttack {reported.get('autoattack_acc')}%")
    return '\n'.join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from robust_resnets.attacks.spec import check_pixel_units, default_eps, parse_attacks
    from robust_resnets.cli._output import check_out
    from robust_resnets.evaluation import evaluate
    from robust_resnets.evaluation.evaluate import check_seed
    from robust_resnets.evaluation.results import format_eps, parse_eps, result_to_dict, write_json
    from robust_resnets.evaluation.sources import (check_input_fits, exported_model, load_dataset, load_model,
                                                   model_notes, resolve_model_name, weights_entry)

    exported = exported_model(args.model)
    if exported is not None:  # a run directory or another exported folder: its architecture and weights
        if args.checkpoint is not None or args.random_init:
            raise ValueError(f'{args.model} brings its own weights; drop --checkpoint / --random-init.')
        args.model, weights, trained_on = exported[0], exported[1], exported[2]
        args.checkpoint = str(weights)
        args.dataset = args.dataset or trained_on
    resolved = resolve_model_name(args.model, checkpoint=args.checkpoint, random_init=args.random_init)
    if resolved != args.model:
        print(f'robust-resnets eval: note: {args.model} resolves to its default tag, {resolved}', file=sys.stderr)
        args.model = resolved
    entry = weights_entry(args.model)
    if args.dataset is None:
        args.dataset = entry.dataset if entry is not None else 'cifar10'
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    norm = args.norm or (entry.threat_model if entry is not None and entry.threat_model else 'Linf')
    if args.eps is not None:
        eps = parse_eps(args.eps)
    elif entry is not None and entry.eps_value is not None and entry.threat_model == norm:
        eps = entry.eps_value
    else:
        eps = default_eps(norm=norm, dataset=args.dataset)
    step_size = parse_eps(args.step_size) if args.step_size is not None else None
    check_pixel_units(eps, norm=norm, name='--eps', text=args.eps)
    if step_size is not None:
        check_pixel_units(step_size, norm=norm, name='--step-size', text=args.step_size)
    specs = parse_attacks(args.attacks, eps=eps, norm=norm, step_size=step_size)  # bad names fail before any loading
    if norm == 'Linf' and step_size is not None and step_size > eps:
        # not refused: a step of 2.5 * eps / steps is in use; but 0.8 is how Huang et al.'s scripts spell 0.8/255
        hint = f' Steps are in pixel units like --eps: did you mean --step-size {args.step_size}/255?' \
            if '/' not in args.step_size else ''
        print(f'robust-resnets eval: warning: --step-size {args.step_size} is larger than eps ({format_eps(eps)}): '
              f'each PGD/CW step is longer than the ball\'s radius (the default is eps/10 for 20 steps or '
              f'more).{hint}', file=sys.stderr)
    check_seed(args.seed, name='--seed')  # before torch.manual_seed, which takes no larger seed
    if args.checkpoint is not None and args.random_init:
        raise ValueError('--checkpoint and --random-init exclude each other.')
    if args.key is not None and args.checkpoint is None:
        raise ValueError('--key names an entry of a --checkpoint file; pass --checkpoint FILE too, or drop --key.')
    check_out(args.out, overwrite=args.overwrite)

    torch.manual_seed(args.seed)  # makes --random-init weights repeatable
    model = load_model(args.model, dataset=args.dataset, checkpoint=args.checkpoint, checkpoint_key=args.key,
                       random_init=args.random_init, device=device)
    notes = model_notes(model, name=args.model)
    for note in notes:
        print(f'robust-resnets eval: note: {note}', file=sys.stderr)
    images, labels, preprocessing = load_dataset(args.dataset, data_dir=args.data_dir, n_examples=args.n_examples,
                                                 model=model, imagenet_subset=args.imagenet_subset,
                                                 download=args.download, progress=not args.quiet)
    check_input_fits(model, images, name=args.model, dataset=args.dataset)
    state = args.state or (f'{args.out}.state.json' if args.out else None)
    if state and Path(state).exists():
        print(f'resuming from {state} (attacks finished there are not run again)', file=sys.stderr)
    try:
        result = evaluate(model, images, labels, attacks=specs, eps=eps, norm=norm, step_size=step_size,
                          batch_size=args.batch_size, device=device, seed=args.seed, state_path=state,
                          progress=not args.quiet, allow_train_mode=args.allow_train_mode,
                          allow_randomized=args.allow_randomized, check_masking=not args.no_masking_check)
    except KeyboardInterrupt:
        print(f'robust-resnets eval: progress saved in {state}; run the same command again to resume'
              if state and Path(state).exists() else
              'robust-resnets eval: nothing kept (a run with --out or --state resumes after an interruption)',
              file=sys.stderr)
        raise
    arch, _, tag = args.model.partition('.')
    data = result_to_dict(result, model=args.model, dataset=args.dataset, architecture=arch, tag=tag or None,
                          checkpoint=args.checkpoint, data_source=str(args.data_dir), preprocessing=preprocessing,
                          random_init=args.random_init, robustbench_id=args.robustbench_id, notes=notes)
    print(format_table(data))
    if args.out:
        write_json(data, args.out)
        if state and Path(state).exists():
            Path(state).unlink()  # finished: the progress file is no longer needed
        print(f'wrote {args.out}', file=sys.stderr)
    return 0
