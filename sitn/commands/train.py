"""``sitn train``: train SITN offline on the start of an events file, for ``sitn run --warm-start``.

The events up to a cut-off (``--until-fraction`` of the events, or ``--until-timestamp``) are the
training data; the epoch count is chosen on a validation split inside them (early stopping, as
``sitn eval``), then the model is retrained on every event up to the cut-off for that many epochs and
saved. ``learner.offline.warm_start`` says exactly how; nothing after the cut-off is read.

    sitn train --events ../shared/data/amazon_movie_book_c2dsr/events.csv --source movie --target book \\
        --until-fraction 0.5 --output var/warm.pt
    sitn run --events ../shared/data/amazon_movie_book_c2dsr/events.csv --warm-start var/warm.pt
"""

from __future__ import annotations

import argparse
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from learner.offline.sitn_ranker import BATCH_BY, DEFAULT_BATCH_BY
from sitn.commands import events_file_flags, learner_shape_flags

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train SITN offline on the start of an events file (for sitn run --warm-start)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--events", type=Path, required=True, help="events.csv in the shared format")
    p.add_argument("--source", required=True, help="source domain name, e.g. movie")
    p.add_argument("--target", required=True, help="target domain name, e.g. book")
    p.add_argument("--output", type=Path, required=True, help="the model file to write")
    cut = p.add_mutually_exclusive_group(required=True)
    cut.add_argument("--until-fraction", type=float, help="train on the first X of the events (0 < X < 1), by time")
    cut.add_argument("--until-timestamp", type=float, help="train on the events at or before this unix second")
    events_file_flags().add_to(p.add_argument_group(
        "how the file is read: as sitn run reads it, so the cut-off is the same event time (sitn.settings.RunSettings)"))
    learner_shape_flags().add_to(p.add_argument_group("the model's shape: sitn run's learner settings (sitn.settings.RunSettings)"))
    p.add_argument("--batch-size", type=int, default=512, help="mini-batch size (default: %(default)s, as sitn eval)")
    p.add_argument("--batch-by", choices=BATCH_BY, default=DEFAULT_BATCH_BY,
                   help="what --batch-size counts: target-domain examples or examples of either domain "
                        "(default: %(default)s, as sitn eval)")
    p.add_argument("--max-epochs", type=int, default=30, help="epochs at most (default: %(default)s)")
    p.add_argument("--patience", type=int, default=3, help="epochs without validation gain before stopping (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="model seed (default: %(default)s)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: torch's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from learner.core.config import SITNConfig
    from learner.core.warm_checkpoint import save_warm_start
    from learner.offline.warm_start import cut_off, train_warm_start
    from stream.dataset import load_events

    read = events_file_flags().build(args)
    shape = learner_shape_flags().build(args)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    events = load_events(args.events, args.source, args.target, limit=read.limit, time_unit=read.time_unit)
    trained_until = cut_off(events.events, args.until_fraction, args.until_timestamp)
    config = SITNConfig(dim=shape.learner_dim, n_views=shape.learner_views, max_len=shape.learner_max_len, seed=args.seed)
    warm = train_warm_start(events.events, args.source, args.target, config, trained_until,
                            batch_size=args.batch_size, batch_by=args.batch_by, max_epochs=args.max_epochs, patience=args.patience)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_warm_start(warm, args.output)
    when = datetime.fromtimestamp(trained_until, UTC).isoformat()
    after = sum(1 for e in events.events if e.timestamp > trained_until)
    print(f"sitn train: {warm.events:,} events up to {when} ({trained_until:.0f}), {warm.epochs} epochs chosen on "
          f"validation (NDCG@10 {warm.validation_ndcg_at_10:.4f}); {after:,} later events left for the stream; "
          f"model written to {args.output}")
    return 0
