"""``robust-resnets leaderboard``: a Markdown or HTML table from results files, beside RobustBench's numbers."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'leaderboard', help='render results JSON files as a Markdown/HTML leaderboard',
        description='Render results files written by `robust-resnets eval --out` as one table, with the clean and '
                    'AutoAttack accuracy RobustBench reports for the same models. Every attack of a file is shown: '
                    'the AutoAttack column is standard AutoAttack (aa), as RobustBench reports it; other AutoAttack '
                    'runs (aa-plus, aa-rand, aa:<attack>+...) are in the attacks column with PGD, CW and FGSM, and '
                    'the worst case is per example over all of them.')
    parser.add_argument('results', nargs='+', help='results JSON files')
    parser.add_argument('--format', choices=('markdown', 'html'), default=None,
                        help='default: from --out (.html -> html), else markdown')
    parser.add_argument('--out', default=None, help='file to write, atomically (default: print)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --out file')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from robust_resnets.cli._output import check_out
    from robust_resnets.evaluation.leaderboard import leaderboard_rows, render_html, render_markdown
    from robust_resnets.files import write_text

    fmt = args.format or ('html' if args.out and args.out.lower().endswith(('.html', '.htm')) else 'markdown')
    if args.out is not None and Path(args.out).resolve() in {Path(r).resolve() for r in args.results}:
        raise ValueError(f'--out {args.out} is one of the results files to read; choose another --out.')
    check_out(args.out, overwrite=args.overwrite, example='leaderboard.html' if fmt == 'html' else 'leaderboard.md')
    rows = leaderboard_rows(args.results)
    text = render_html(rows) if fmt == 'html' else render_markdown(rows)
    if args.out is None:
        print(text, end='')
        return 0
    write_text(text, args.out)
    return 0
