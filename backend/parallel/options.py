"""The two command-line options every tensor/expert-parallel entry point takes (no torch import: --help stays fast)."""

from __future__ import annotations


def add_parallel_arguments(parser, where: str) -> None:
    """--tensor-parallel and --expert-parallel, the names `ParallelConfig`'s errors use; `where` says
    what runs the processes (e.g. "on this host, CPU only")."""
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help=f"split the attention heads and expert widths over N processes ({where}); N must "
                             "divide the heads and widths (default 1)")
    parser.add_argument("--expert-parallel", type=int, default=1, metavar="M",
                        help=f"spread the routed experts over M processes ({where}); M must divide the expert count "
                             "and, with --tensor-parallel, equal N (default 1)")
