"""`hvdscale report RUN_DIR [RUN_DIR ...] [--out DIR]`: one HTML page (plots embedded, opens
offline from a cluster's file system) and the PNGs, comparing runs on time to accuracy."""


def add_arguments(parser):
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="output directories of `hvdscale train` (with metrics.jsonl)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where to write index.html and the PNGs (default: RUN_DIR/report "
                             "for one run, report/ next to the runs for several)")
    parser.add_argument("--title", default=None, help="the page's heading")
    parser.add_argument("--any-recipe", action="store_true",
                        help="compare runs even when their recipes' names differ")


def run(args):
    from hvdscale.report import write_report
    page = write_report(args.runs, args.out, any_recipe=args.any_recipe, title=args.title)
    print(f"report: {page.resolve()}")
    return 0
