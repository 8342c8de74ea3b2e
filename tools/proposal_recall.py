"""Recall of a proposal file against a VOC-layout split's ground truth (difficult objects excluded).

    python tools/proposal_recall.py --data-root DIR --split test --proposals out/ss_test.npz [--out DIR]

Prints recall@0.5, recall@0.7 and average recall (IoU 0.50:0.05:0.95) for the first 100, 300, 1000,
2000 and all proposals of each image; with --out also writes recall.json and recall.png (recall
against the number of proposals). Objects marked <difficult> are left out of the ground truth, as
the VOC devkit leaves them out of npos.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from detector.data.voc import VOCDataError, load_voc_split
from proposals import ProposalFileError, load_proposals, proposal_recall

log = logging.getLogger("proposal_recall")
TOP_KS = (100, 300, 1000, 2000)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True, type=Path)
    ap.add_argument("--split", required=True)
    ap.add_argument("--proposals", required=True, type=Path, help=".npz / .mat / .pkl")
    ap.add_argument("--out", type=Path, default=None, help="folder for recall.json and recall.png")
    ap.add_argument("--allow-extra", action="store_true", help="file may hold other images too")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        records, class_names = load_voc_split(args.data_root, args.split, log_summary=False)
        props = load_proposals(args.proposals, [r.image_id for r in records], allow_extra=args.allow_extra)
    except (VOCDataError, ProposalFileError) as e:
        sys.exit(f"error: {e}")
    gts = [r.boxes[~r.difficult].numpy() for r in records]  # difficult objects excluded
    plist = [props[r.image_id] for r in records]
    res = proposal_recall(plist, gts, top_ks=TOP_KS)
    n_diff = sum(int(r.difficult.sum()) for r in records)
    print(f"{args.proposals} on {args.split}: {res['num_images']} images, {res['num_gt']} objects "
          f"({n_diff} difficult excluded), {res['mean_boxes']:.1f} boxes/image")
    print(f"{'top k':>8} {'recall@0.5':>11} {'recall@0.7':>11} {'AR':>7}")
    for row in res["rows"]:
        print(f"{row['k']!s:>8} {row['recall@0.5']:11.4f} {row['recall@0.7']:11.4f} {row['AR']:7.4f}")
    # per class, every proposal: the cap on each class's detection recall (and AP)
    res["per_class"] = []
    w = max([5] + [len(c) for c in class_names])
    print(f"{'class':<{w}} {'objects':>8} {'recall@0.5':>11} {'recall@0.7':>11} {'AR':>7}   (all proposals)")
    for k, name in enumerate(class_names):
        gk = [r.boxes[(~r.difficult) & (r.labels == k)].numpy() for r in records]
        row = proposal_recall(plist, gk, top_ks=())["rows"][-1]
        n_k = sum(len(g) for g in gk)
        res["per_class"].append({"class": name, "objects": n_k, **{c: row[c] for c in ("recall@0.5", "recall@0.7", "AR")}})
        print(f"{name:<{w}} {n_k:>8d} {row['recall@0.5']:11.4f} {row['recall@0.7']:11.4f} {row['AR']:7.4f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        ks = sorted({int(k) for k in np.unique(np.geomspace(1, max(2, max(len(p) for p in plist)), 40).astype(int))})
        curve = proposal_recall(plist, gts, top_ks=ks)
        res["curve"] = [{"k": r["k"], "recall@0.5": r["recall@0.5"], "recall@0.7": r["recall@0.7"],
                         "AR": r["AR"]} for r in curve["rows"][:-1]]
        res.update(proposals=str(args.proposals), split=args.split, data_root=str(args.data_root),
                   difficult_excluded=n_diff)
        tmp = args.out / f".recall.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, args.out / "recall.json")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for key in ("recall@0.5", "recall@0.7", "AR"):
            ax.plot([c["k"] for c in res["curve"]], [c[key] for c in res["curve"]], label=key)
        ax.set_xscale("log")
        ax.set_xlabel("proposals per image (first k)")
        ax.set_ylabel("recall")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title(f"{args.proposals.name} on {args.split}")
        fig.tight_layout()
        tmp = args.out / f".recall.png.{os.getpid()}.tmp.png"
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, args.out / "recall.png")
        log.info("wrote %s and %s", args.out / "recall.json", args.out / "recall.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
