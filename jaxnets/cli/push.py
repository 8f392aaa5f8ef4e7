"""``jaxnets-push``: a weights file or a ``train.py`` run directory to a Hugging Face Hub repo that jaxnets and
timm both load (``jaxnets.push_to_hub``).

A user error (no such file, no token, the Hub unreachable) is one line on stderr and exit status 1; anything else
is a bug and keeps its traceback (``jaxnets.errors.run_cli``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from jaxnets import errors
from jaxnets.hub_upload import DEFAULT_COMMIT_MESSAGE, push_to_hub, write_hub_folder

PROG = "jaxnets-push"
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")  # the Hub's ORG/NAME

DESCRIPTION = ("Upload jaxnets weights (a file, or a train.py run directory with its metrics and curves) to a "
               "Hugging Face Hub repo: timm's format, a model card, classes.txt.")
EXAMPLES = """\
    {cmd} runs/resnet50-flowers me/resnet50-flowers             # the run's final weights, metrics, curves
    {cmd} finetuned.safetensors me/resnet50-flowers --private
    {cmd} runs/resnet50-flowers me/resnet50-flowers --revision v2 --message "longer schedule"
    {cmd} runs/resnet50-flowers me/resnet50-flowers --dry-run out/   # write the folder only

Log in first (hf auth login) or set HF_TOKEN. Load the repo back with
jaxnets.load_pretrained("hf-hub:ORG/REPO") or timm.create_model("hf-hub:ORG/REPO", pretrained=True).
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = errors.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EXAMPLES.format(cmd=prog),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="RUN_DIR|WEIGHTS", help="a train.py run directory or a jaxnets weights file")
    parser.add_argument("repo_id", metavar="ORG/REPO", help="the Hub repo (created when missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", metavar="BRANCH", help="the branch to commit to (created when missing; "
                                                             "default main)")
    parser.add_argument("--message", default=DEFAULT_COMMIT_MESSAGE, help="the commit message")
    parser.add_argument("--token", help="a Hugging Face token (default: the logged-in one, or HF_TOKEN)")
    parser.add_argument("--license", metavar="ID", help="the card's licence (a Hub licence id such as apache-2.0); "
                                                        "default: the base checkpoint's")
    parser.add_argument("--dry-run", metavar="DIR", help="write the repo's folder into DIR, upload nothing")
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the command; the exit status."""
    prog = prog or errors.command("push")
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not REPO_ID.fullmatch(args.repo_id):
        parser.error(f"ORG/REPO {args.repo_id!r}: expected the Hub repo as ORG/NAME (e.g. me/resnet50-flowers)")

    def push() -> int:
        if args.dry_run:
            print(f"wrote {write_hub_folder(args.source, args.dry_run, repo_id=args.repo_id, license=args.license)}")
        else:
            print(push_to_hub(args.source, args.repo_id, private=args.private, revision=args.revision,
                              commit_message=args.message, token=args.token, license=args.license))
        return 0

    return errors.run_cli(prog, push)


if __name__ == "__main__":
    with errors.invoked_as("push", "python -m jaxnets.cli.push"):
        sys.exit(main())
