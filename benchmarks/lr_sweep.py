"""Every stage-2-budget arm at its own best learning rate (a sweep on the validation split).

The arms: ``nima`` (stage 1 continued for stage 2's epochs: the equal-budget baseline, field
``nima_continue_lr``), ``ada`` and ``avg`` (MPEMD's two losses, ``mpemd_lr`` / ``mpemd_avg_lr``).

At typical patch EMDs (0.05-0.1) MPEMD_ada's weights ``w_j = 1 - EMDc_j ** gamma`` are small, so its
gradients are an order of magnitude smaller than MPEMD_avg's: comparing both at one learning rate
favours one of them by construction. This script first measures the gradient ratio at the stage-1
weights, then trains stage 2 from the same stage-1 run for every (loss, lr), picks each loss's best
lr by the validation metric (``best_metric``, default EMD_2), and prints one Markdown table.

    python -m benchmarks.lr_sweep --root data/demo --init nima-<tag> --preset cpu \\
        --set image_size=96 --set mpemd_epochs=2 --lrs 0.003,0.01,0.03,0.1 --losses nima,ada,avg

``reproduce --tune-lr`` makes the same choice inside the protocol (``flows/reproduce.py``).

The root needs manifests (``mpemd ingest`` / ``mpemd demo``) and the stage-1 run given as ``--init``.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import torch

from model.losses import mpemd_loss
from model.networks import backbone_config
from tasks.core import markdown
from tasks.core.cli_values import parse_key_value
from tasks.training.datasets import ManifestDataset, make_loader, read_manifest
from tasks.training.loop import batch_probs, fit
from tasks.training.presets import TrainConfig, resolve_config
from tasks.training.runs import load_init_weights
from tasks.training.setup import build_network

COLUMNS = ("loss", "lr", "epochs", "best_epoch", "val_emd2", "val_lcc", "val_srcc", "val_mse", "seconds")


def gradient_ratio(cfg: TrainConfig, root: str, init: str, batches: int = 2) -> dict[str, float]:
    """Mean gradient norm of MPEMD_avg over MPEMD_ada at the stage-1 weights (same patches)."""
    net, _ = build_network(cfg, "mpemd", root, None, None)
    load_init_weights(net, root, init)
    net.eval()  # fixed BatchNorm statistics and no dropout: the two losses see the same forward pass
    records = read_manifest(f"{root}/manifests/train.parquet", cfg.max_train_samples)
    dataset = ManifestDataset(records, backbone_config(cfg.backbone, cfg.image_size), "mpemd", train=True,
                              n_patches=cfg.n_patches, seed=cfg.seed)
    loader = make_loader(dataset, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, num_workers=0,
                         pin_memory=False)
    loader.sampler.set_epoch(0)
    norms: dict[str, list[float]] = {"ada": [], "avg": []}
    patch_emd = []
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        probs = batch_probs(net, batch.inputs(torch.device("cpu")), False)
        for loss in ("ada", "avg"):
            net.zero_grad()
            value = mpemd_loss(probs, batch.targets, k=cfg.k, gamma=cfg.gamma, eps=cfg.eps,
                               adaptive=loss == "ada")
            value.backward(retain_graph=True)
            grads = [p.grad.pow(2).sum() for p in net.parameters() if p.grad is not None]
            norms[loss].append(float(torch.stack(grads).sum().sqrt()))
        cdf = torch.cumsum(probs.detach() - batch.targets.unsqueeze(1), dim=-1)
        patch_emd.append(float(cdf.pow(2).mean(dim=-1).sqrt().mean()))
    ada, avg = sum(norms["ada"]) / len(norms["ada"]), sum(norms["avg"]) / len(norms["avg"])
    return {"grad_norm_ada": ada, "grad_norm_avg": avg, "avg_over_ada": avg / ada if ada else math.nan,
            "mean_patch_emd": sum(patch_emd) / len(patch_emd)}


def sweep(cfg: TrainConfig, root: str, init: str, losses: list[str], lrs: list[float], tag: str
          ) -> list[dict[str, Any]]:
    rows = []
    for loss in losses:
        for lr in lrs:
            start = time.perf_counter()
            if loss == "nima":  # NIMA continued from stage 1 for stage 2's epochs
                run_cfg = TrainConfig(**{**cfg.to_dict(), "nima_continue_lr": lr})
                result = fit(run_cfg, root=root, method="nima", run_id=f"sweep-{tag}-nima-{lr:g}", init=init)
            else:
                run_cfg = TrainConfig(**{**cfg.to_dict(), "loss": loss, "mpemd_lr": lr, "mpemd_avg_lr": None})
                result = fit(run_cfg, root=root, method="mpemd", run_id=f"sweep-{tag}-{loss}-{lr:g}", init=init)
            best = result.best_val
            rows.append({"loss": loss, "lr": lr, "epochs": result.epochs_run, "best_epoch": result.best_epoch + 1,
                         "val_emd2": best.get("emd2"), "val_lcc": best.get("lcc"), "val_srcc": best.get("srcc"),
                         "val_mse": best.get("mse"), "seconds": round(time.perf_counter() - start, 1),
                         "metric": best.get(cfg.best_metric)})
    return rows


def best_per_loss(rows: list[dict[str, Any]], mode: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        value = row["metric"]
        if value is None or math.isnan(value):
            continue
        current = out.get(row["loss"])
        if current is None or (value < current["metric"] if mode == "min" else value > current["metric"]):
            out[row["loss"]] = row
    return out


def render(rows: list[dict[str, Any]], best: dict[str, dict[str, Any]], ratio: dict[str, float], metric: str) -> str:
    lines = [f"Gradient norm at the stage-1 weights (mean patch EMD {ratio['mean_patch_emd']:.3f}): "
             f"ada {ratio['grad_norm_ada']:.4g}, avg {ratio['grad_norm_avg']:.4g}, "
             f"avg / ada = {ratio['avg_over_ada']:.1f}", "",
             markdown.table([*COLUMNS, "best"], [[f"{row[c]:g}" if c == "lr" else row[c] for c in COLUMNS]
                                                 + ["**best**" if best.get(row["loss"]) is row else ""]
                                                 for row in rows]), ""]
    for loss, row in best.items():
        lines.append(f"- {loss}: best lr {row['lr']:g} (val {metric} {row['metric']:.4f}, LCC {row['val_lcc']:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="data root with manifests and the stage-1 run")
    parser.add_argument("--init", required=True, help="stage-1 run id (or checkpoint URL) every run starts from")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], type=parse_key_value, metavar="FIELD=VALUE")
    parser.add_argument("--lrs", default="0.003,0.01,0.03,0.1", help="stage-2 learning rates (mpemd_lr)")
    parser.add_argument("--losses", default="nima,ada,avg", help="arms: nima (continued), ada, avg")
    parser.add_argument("--tag", default="lr", help="run ids are sweep-<tag>-<loss>-<lr>")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = resolve_config(args.preset, dict(args.overrides))
    ratio = gradient_ratio(cfg, args.root, args.init)
    rows = sweep(cfg, args.root, args.init, args.losses.split(","), [float(x) for x in args.lrs.split(",")],
                 args.tag)
    print(render(rows, best_per_loss(rows, cfg.best_mode), ratio, cfg.best_metric))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
