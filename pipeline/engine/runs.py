"""Saving and loading what training produces: a head run's directory (``config.json`` +
``heads.safetensors``) and a fine-tuned checkpoint (backbone and head in one safetensors file,
provenance in its metadata), and the cache a run was trained on. Test-time settings of the
sampling chains may change on load; anything the weights were fitted to may not.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..core.config import ConfigError, apply_overrides, from_dict
from ..models.heads import METHODS, Dims
from ..store import FeatureCache, require_same_inputs
from .backbones import VisionBackbone, VisionSpec, build_vision, read_checkpoint_meta
from .training import HeadsModel


class FinetuneError(RuntimeError):
    """Fine-tuning cannot run as asked, or a checkpoint cannot be used (bad option, missing
    text cache, a backbone saved without its head...)."""


def save_heads(model: HeadsModel, path: Path) -> None:
    """Write the run's weights (standardisers + head) as safetensors, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"method": model.method})
    tmp.replace(path)


# leaf names of the sampling-chain settings that may change after training (``eval --set``);
# the noise schedule itself (``*.schedule.*``) is what the denoisers were trained on
TEST_TIME_SETTINGS = frozenset({"sampler", "steps", "eta", "test_samples", "val_sampler",
                                "val_steps"})


def is_test_time_setting(key: str) -> bool:
    """Whether ``--set key=...`` only changes how a trained run samples at test time."""
    parts = key.split(".")
    return parts[-1] in TEST_TIME_SETTINGS and "schedule" not in parts


def rebuild_heads(method: str, method_config: dict[str, Any], dims: dict[str, int],
                  state: dict[str, torch.Tensor], where: str,
                  overrides: dict[str, Any] | None = None) -> tuple[HeadsModel, Any]:
    """A trained :class:`HeadsModel` from its saved settings and weights (a run, or a
    fine-tuned checkpoint), with ``overrides`` of test-time settings only
    (:func:`is_test_time_setting`); returns the model (eval mode) and its resolved config."""
    if method not in METHODS:
        raise ConfigError(f"{where}: unknown method {method!r}")
    saved = from_dict(METHODS[method].config, method_config)
    apply_overrides(saved, overrides or {})  # unknown keys and bad values are named first
    trained = [key for key in overrides or {} if not is_test_time_setting(key)]
    if trained:
        raise ConfigError(f"{where}: --set {', '.join(trained)} changes the trained heads "
                          "(what the weights were fitted to), so it needs a new training run; "
                          "only test-time settings of the sampling chains ("
                          f"{', '.join(sorted(TEST_TIME_SETTINGS))}) can change after training")
    method_cfg = apply_overrides(saved, overrides or {})
    model = HeadsModel(method, method_cfg, Dims(**dims))
    model.load_state_dict(state)
    return model.eval(), method_cfg


def load_run(run_dir: Path | str, device: torch.device | str = "cpu",
             overrides: dict[str, Any] | None = None) -> tuple[HeadsModel, dict[str, Any]]:
    """Rebuild a trained run's model from ``config.json`` and ``heads.safetensors``.

    ``overrides`` (``KEY=VALUE`` as for training) change test-time settings of the trained
    heads, e.g. ``diffusion.sampler=ddim``, ``diffusion.steps=10``, ``diffusion.test_samples``
    (:func:`is_test_time_setting`); any other setting is refused. The returned config records
    them.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    for name in ("config.json", "heads.safetensors"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished run: {name} is missing "
                                    "(train it with `marnet train-heads`)")
    config = json.loads((run_dir / "config.json").read_text())
    model, method_cfg = rebuild_heads(config["method"], config["method_config"], config["dims"],
                                      load_file(str(run_dir / "heads.safetensors")),
                                      str(run_dir), overrides)
    if overrides:
        config = {**config, "method_config": asdict(method_cfg),
                  "eval_overrides": {k: str(v) for k, v in overrides.items()}}
    return model.to(device), config


def split_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                          dict[str, torch.Tensor]]:
    """``(backbone, heads)`` state dicts of a checkpoint's tensors."""
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    heads = {k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")}
    return backbone, heads


def load_finetuned(path: Path | str, device: torch.device, weights_dir: Path | str,
                   overrides: dict[str, Any] | None = None, inference: bool = True
                   ) -> tuple[VisionBackbone, HeadsModel, dict[str, Any]]:
    """A checkpoint's backbone (on ``device``, eval mode; ready for inference, its norms
    folded, unless ``inference`` is False), its head and its provenance; ``overrides`` change
    test-time settings of the head (as ``eval --set``; the provenance's ``method_config`` is
    then the resolved one, and ``eval_overrides`` records them)."""
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(path)
    if "head_method" not in meta:
        raise FinetuneError(f"{path} holds a backbone without its head (made by an earlier "
                            "marnet): use it with `marnet extract --finetuned` and train heads "
                            "on that cache, or fine-tune again to classify with it directly")
    vision = build_vision(VisionSpec(finetuned=str(path)), weights_dir).to_runtime(device)
    if inference:
        vision.for_inference()
    _, heads_state = split_checkpoint(load_file(str(path)))
    try:
        heads, method_cfg = rebuild_heads(meta["head_method"], meta["method_config"],
                                          meta["dims"], heads_state, str(path), overrides)
    except ConfigError as exc:
        raise FinetuneError(str(exc)) from exc
    if overrides:
        meta = {**meta, "method_config": asdict(method_cfg),
                "eval_overrides": {k: str(v) for k, v in overrides.items()}}
    return vision, heads.to(device), meta


def run_cache(config: dict[str, Any], cache: Path | str | None = None) -> FeatureCache:
    """The cache a run was trained on (or ``cache``): complete, and with the same key.

    A different key is refused with the key inputs that differ (visual weights, template...).
    """
    fc = FeatureCache(cache or config["cache"]["path"]).require_complete()
    require_same_inputs(config["cache"], fc.manifest, str(fc.root))
    return fc
