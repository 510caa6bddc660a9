"""What each loss term of an end-to-end MARNet sends into the backbone.

End to end, the backbone is trained by the sum of MARNet's stage-(a) terms: the EMA branch's
CE and ITA (Eq. 13) and the CDR branch's CE and MSE (Eq. 20). Whether CDR adds anything on
top of EMA depends on what its gradient does to the shared backbone: how large it is next to
EMA's, and whether it points the same way (it then only rescales EMA's step), the opposite
way (it fights it), or elsewhere (it teaches the backbone something else). This probe takes a
fine-tuned checkpoint, draws training batches (augmented, as in training), and for each term
computes its gradient with respect to the backbone's trained parameters: the norms, and the
cosine between every pair of terms, averaged over the batches.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..datasets import load_dataset
from ..datasets.images import ImageFiles, TrainAugment
from ..engine.backbones import resolve_device
from ..engine.runs import FinetuneError, load_finetuned
from ..models.heads.marnet import MARNet
from ..models.losses import feature_mse
from .finetune import text_tables, trainable_prefix


def marnet_terms(head: MARNet, batch: dict[str, torch.Tensor],
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """MARNet's stage-(a) loss terms of one batch, each with its weight and its gradients:
    ``alpha1 CE`` and ``beta ITA`` of EMA (Eq. 13), ``alpha2 CE`` and ``gamma MSE`` of CDR
    (Eq. 20); their sum is the loss end-to-end training minimises."""
    cfg, labels = head.cfg, batch["label"]
    terms = {}
    if head.ema is not None:
        f_v = head.ema.embed(batch["visual"])
        logits = head.ema.classifier(f_v)
        terms["EMA: CE"] = cfg.ema.ce_weight * F.cross_entropy(logits, labels)
        terms["EMA: ITA"] = cfg.ema.weight * head.ema.alignment_terms(batch, f_v, logits,
                                                                      generator)[0]
    if head.cdr is not None:
        x0_hat = head.cdr.reconstruct(batch, head.schedule_on(labels.device), generator)
        terms["CDR: CE"] = cfg.alpha2 * F.cross_entropy(head.cdr.classifier(x0_hat), labels)
        terms["CDR: MSE"] = cfg.gamma * feature_mse(x0_hat, batch["text"])
    return terms


def _flat_gradient(term: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(grads, params)])


def branch_gradients(checkpoint: Path | str, batches: int = 8, batch_size: int | None = None,
                     text_cache: Path | str | None = None, device: str = "auto",
                     num_workers: int = 2, weights_dir: Path | str = "cache/weights",
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Gradient norms of each MARNet term (and of the EMA and CDR sums) on the checkpoint's
    trained backbone parameters, and the cosine between every pair, averaged over
    ``batches`` augmented training batches."""
    dev = resolve_device(device)
    vision, heads, meta = load_finetuned(checkpoint, dev, weights_dir, inference=False)
    if meta["head_method"] != "marnet":
        raise FinetuneError(f"{checkpoint} was trained with --method {meta['method']}; the "
                            "branch gradient probe reads MARNet's EMA and CDR terms")
    source = meta["source"]
    info = load_dataset(meta["dataset"], source["root"], meta["template"],
                        **source.get("options", {}))
    text = text_tables(Path(text_cache or source["text_cache"]), info, ("text",))["text"]
    records = info.splits["train"]
    trainable_prefix(vision.model, meta["train_blocks"])
    params = [p for p in vision.model.parameters() if p.requires_grad]
    vision.model.eval()  # gradients of the trained network as it is; no statistics move
    labels = torch.tensor([r.label for r in records], device=dev)
    text = heads.norm_text(text.to(dev))
    size = batch_size or meta["batch_size"]
    generator = torch.Generator().manual_seed(meta["seed"])
    images = ImageFiles([r.image for r in records],
                        TrainAugment(vision.data_config["input_size"][-1]))
    order = torch.randperm(len(records), generator=generator)[:batches * size].view(-1, size)
    loader = torch.utils.data.DataLoader(images, batch_sampler=order.tolist(),
                                         num_workers=num_workers)
    noise = torch.Generator(device=dev).manual_seed(meta["seed"])
    norms: dict[str, list[float]] = {}
    cosines: dict[tuple[str, str], list[float]] = {}
    for batch_images, index, _ in loader:
        index = index.to(dev)
        batch = {"visual": heads.norm_visual(vision.features(batch_images)),
                 "text": text[index], "label": labels[index]}
        terms = marnet_terms(heads.head, batch, noise)
        terms["EMA (sum)"] = sum(v for k, v in terms.items() if k.startswith("EMA:"))
        terms["CDR (sum)"] = sum(v for k, v in terms.items() if k.startswith("CDR:"))
        grads = {name: _flat_gradient(term, params) for name, term in terms.items()}
        for name, g in grads.items():
            norms.setdefault(name, []).append(g.norm().item())
        for a, b in itertools.combinations(grads, 2):
            cosines.setdefault((a, b), []).append(F.cosine_similarity(grads[a], grads[b],
                                                                      dim=0).item())
    log(f"probed {batches} batches of {size} augmented train images")
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"checkpoint": str(checkpoint), "batches": batches, "batch_size": size,
            "parameters": sum(p.numel() for p in params),
            "norms": {k: mean(v) for k, v in norms.items()},
            "cosines": {f"{a} | {b}": mean(v) for (a, b), v in cosines.items()}}
