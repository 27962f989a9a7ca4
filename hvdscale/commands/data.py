"""`hvdscale data`: make or check image-folder data sets.

    hvdscale data imagefolder --from fashion-mnist OUT [--size 28] [--train-limit N] ...
    hvdscale data check DIR [--json] [--strict]
"""
import json
import os

from hvdscale.errors import ConfigError

SOURCES = ("fashion-mnist",)


def add_arguments(parser):
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    make = sub.add_parser("imagefolder", help="write a JPEG image directory (train/ and val/)")
    make.set_defaults(_action=_imagefolder)
    make.add_argument("out", metavar="OUT", help="new directory to write")
    make.add_argument("--from", dest="source", default="fashion-mnist", choices=SOURCES,
                      help="data set to convert (default fashion-mnist)")
    make.add_argument("--root", default=None, help="directory of the source's files "
                      "(default: Debian's /usr/share/datasets/fashion-mnist)")
    make.add_argument("--size", type=int, default=28,
                      help="side of the written images in pixels; >28 upscales (default 28)")
    make.add_argument("--train-limit", type=int, default=None, help="write the first N training images")
    make.add_argument("--val-limit", type=int, default=None, help="write the first N test images")
    make.add_argument("--quality", type=int, default=90, help="JPEG quality 1..95 (default 90)")
    check = sub.add_parser("check", help="class counts, unreadable files and image sizes of DIR")
    check.set_defaults(_action=_check)
    check.add_argument("dir", metavar="DIR", help="image directory (with train/ and val/, or one split)")
    check.add_argument("--json", action="store_true", help="print the report as one JSON object")
    check.add_argument("--strict", action="store_true", help="exit 1 when any file is unreadable")
    check.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                       help="decode threads (default: all cores)")
    parser.set_defaults(_parser=parser)


def run(args):
    action = getattr(args, "_action", None)   # set by the chosen sub-command's parser
    if action is None:
        args._parser.print_help()
        return 2
    return action(args)


def _imagefolder(args):
    from hvdscale.data.imagefolder import write_fashion_mnist

    for name in ("train_limit", "val_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, not {value}")
    if not 1 <= args.quality <= 95:
        raise ConfigError(f"--quality must be in 1..95, not {args.quality}")
    counts = write_fashion_mnist(args.out, size=args.size, train_limit=args.train_limit,
                                 val_limit=args.val_limit, quality=args.quality, root=args.root)
    print(f"wrote {counts['train']} training and {counts['val']} validation JPEGs "
          f"({args.size}x{args.size}) to {args.out}")
    return 0


def _check(args):
    from hvdscale.data.check import check_directory, format_report

    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, not {args.threads}")
    reports = check_directory(args.dir, threads=args.threads)
    print(json.dumps(reports) if args.json else format_report(reports))
    bad = sum(len(rep["unreadable"]) for rep in reports.values())
    return 1 if args.strict and bad else 0
