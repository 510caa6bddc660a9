"""MARNet (arXiv 2407.18854): EMA + CDR + fusion, with the Table 2 ablation rows as variants.

- EMA (methods §1.2): :class:`~.alignment.AlignedClassifier` with the ITA loss;
  ``x_EMA = g(E_v x_v)``.
- CDR (methods §1.3): diffuse the standardised text feature and denoise it conditioned on
  ``x_v`` with a 4-layer x0-predicting MLP (Eq. 19-20); at test, sample ``x_CDR`` from
  ``N(0, I)`` by the reverse chain (Eq. 21-23), from the image alone.
- Fusion (methods §1.4, Eq. 24): ``concat | add | mul`` of ``(x_EMA, x_CDR)`` into a linear
  classifier, or CF-VQA's ``sum | hm`` of two per-branch logits.

Variants (Table 2, methods §1.9): ``ema`` (+EMA), ``mlp`` (+MLP control: the same MLP mapping
``x_v`` to the text space with no diffusion, methods §3.15), ``cdr`` (+CDR(MLP): classify
``x_CDR``), ``full`` (+Fusion). Training is staged (methods §3.14): (a) EMA and CDR together
(disjoint parameters, each kept at its best validation epoch), (b) both frozen, the fusion
classifier trained on *sampled* ``x_CDR`` (K samples per train image), as it will see at test.
``joint`` trains fusion in stage (a) on the one-step ``x0_hat`` instead (the option the paper
leaves open).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import require_choice, require_positive
from ..losses import (
    FEATURE_FUSIONS,
    FUSIONS,
    LOGIT_FUSIONS,
    feature_mse,
    fuse_features,
    fuse_logits,
)
from ..schedule import NoiseSchedule
from .alignment import AlignConfig, AlignedClassifier
from .common import ConditionalDenoiser, ScheduleOwner, val_top1
from .contract import Batch, Dims, RowState, SplitData, Stage, TrainContext
from .diffusion import DiffusionConfig, MLPControl, generate_chunked

VARIANTS = ("ema", "mlp", "cdr", "full")


@dataclass
class MARNetConfig:
    """MARNet's settings (methods §1, decisions methods §3).

    ``variant``: the Table 2 row trained (``ema``, ``mlp``, ``cdr`` or ``full``). ``fusion``:
    how ``x_EMA`` and ``x_CDR`` are combined (``concat``, ``add``, ``mul``, ``sum``, ``hm``;
    full only). ``ema``: the EMA branch (alpha1 = ``ema.ce_weight``, beta = ``ema.weight``,
    tau, shared dim d). ``alpha2``/``gamma``: the weights of CE and MSE in L_CDR (Eq. 20).
    ``diffusion``: the CDR denoiser and chains. ``fusion_samples``: K sampled ``x_CDR`` per
    train image the fusion classifier trains on (stage b); ``fusion_epochs``: that stage's
    epochs (None: the trainer's); ``fusion_init``: ``branches`` starts the fusion classifier
    from the trained EMA and CDR classifiers (concat: the sum of their logits; sum/hm: the two
    logit heads), so stage (b) starts from the branches' ensemble instead of from scratch
    (add/mul have no such start and begin random); ``random`` always starts from scratch.
    ``joint``: train the fusion classifier in stage (a) on the one-step reconstruction instead
    of staged training.
    """

    variant: str = "full"
    fusion: str = "concat"
    ema: AlignConfig = field(default_factory=lambda: AlignConfig(loss="ita"))
    alpha2: float = 1.0
    gamma: float = 1.0
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    fusion_samples: int = 4
    fusion_epochs: int | None = None
    fusion_init: str = "branches"
    joint: bool = False

    def __post_init__(self) -> None:
        require_choice("variant", self.variant, VARIANTS)
        require_choice("fusion", self.fusion, FUSIONS)
        if self.variant != "full" and self.fusion != "concat":
            raise ValueError(f"fusion {self.fusion!r} applies to the full model only "
                             f"(variant {self.variant!r} has nothing to fuse)")
        require_choice("fusion_init", self.fusion_init, ("branches", "random"))
        require_positive("fusion_samples", self.fusion_samples)
        require_positive("fusion_epochs", self.fusion_epochs)


class CDRBranch(nn.Module):
    """Cross-modal Diffusion Reconstruction: ``X_theta(x_s^t, t, x_v)`` plus ``Classifier_CDR``."""

    def __init__(self, cfg: MARNetConfig, dims: Dims):
        super().__init__()
        d = cfg.diffusion
        self.cfg = cfg
        self.text_dim = dims.text
        self.denoiser = ConditionalDenoiser(dims.text, dims.visual, d.hidden, d.t_dim, d.layers)
        self.classifier = nn.Linear(dims.text, dims.classes)

    def reconstruct(self, batch: Batch, schedule: NoiseSchedule,
                    generator: torch.Generator) -> torch.Tensor:
        """One training draw: noise the text at a uniform ``t``, predict ``x0_hat`` (Eq. 19)."""
        text = batch["text"]
        t = schedule.sample_timesteps(len(text), text.device, generator)
        noise = torch.randn(text.shape, device=text.device, generator=generator)
        return self.denoiser(schedule.add_noise(text, noise, t), t, batch["visual"])

    def loss(self, batch: Batch, schedule: NoiseSchedule,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """``L_CDR = alpha2 * CE(C_CDR(x0_hat), y) + gamma * MSE(x0_hat, x_s)`` (Eq. 20)."""
        x0_hat = self.reconstruct(batch, schedule, generator)
        ce = F.cross_entropy(self.classifier(x0_hat), batch["label"])
        mse = feature_mse(x0_hat, batch["text"])
        parts = {"cdr_ce": ce.detach(), "mse": mse.detach()}
        return self.cfg.alpha2 * ce + self.cfg.gamma * mse, parts, x0_hat

    def generate(self, visual: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
                 chunk_rows: int, method: str | None = None, steps: int | None = None) -> torch.Tensor:
        """``x_CDR``: the reverse chain from ``N(0, I)`` conditioned on ``x_v`` (Eq. 21-23)."""
        d = self.cfg.diffusion
        return generate_chunked(schedule, self.denoiser, visual, self.text_dim,
                                method or d.sampler, steps or d.steps, d.eta, generator,
                                chunk_rows)


class FusionHead(nn.Module):
    """``Classifier(x_EMA (+) x_CDR)`` for the five fusion modes (Eq. 24, methods §1.4)."""

    def __init__(self, mode: str, ema_dim: int, cdr_dim: int, classes: int):
        super().__init__()
        if mode not in FUSIONS:
            raise ValueError(f"unknown fusion {mode!r}; choose one of {', '.join(FUSIONS)}")
        if mode in ("add", "mul") and ema_dim != cdr_dim:
            raise ValueError(f"fusion {mode!r} needs the EMA dim ({ema_dim}) to equal the text "
                             f"dim ({cdr_dim}); leave ema.d unset or use concat")
        self.mode = mode
        if mode in FEATURE_FUSIONS:
            self.classifier = nn.Linear(ema_dim + cdr_dim if mode == "concat" else ema_dim, classes)
        else:
            self.ema_classifier = nn.Linear(ema_dim, classes)
            self.cdr_classifier = nn.Linear(cdr_dim, classes)

    @torch.no_grad()
    def init_from_branches(self, ema_classifier: nn.Linear, cdr_classifier: nn.Linear) -> None:
        """Start from the trained branch classifiers: concat = the sum of the branch logits,
        sum/hm = the branch logit heads themselves. add/mul keep their random start."""
        if self.mode == "concat":
            d = ema_classifier.in_features
            self.classifier.weight[:, :d].copy_(ema_classifier.weight)
            self.classifier.weight[:, d:].copy_(cdr_classifier.weight)
            self.classifier.bias.copy_(ema_classifier.bias + cdr_classifier.bias)
        elif self.mode in LOGIT_FUSIONS:
            self.ema_classifier.load_state_dict(ema_classifier.state_dict())
            self.cdr_classifier.load_state_dict(cdr_classifier.state_dict())

    def forward(self, x_ema: torch.Tensor, x_cdr: torch.Tensor) -> torch.Tensor:
        if self.mode in FEATURE_FUSIONS:
            return self.classifier(fuse_features(x_ema, x_cdr, self.mode))
        return fuse_logits(self.ema_classifier(x_ema), self.cdr_classifier(x_cdr), self.mode)


class MARNet(ScheduleOwner):
    """The MARNet head; ``variant`` picks the Table 2 row it trains and predicts with."""

    def __init__(self, cfg: MARNetConfig, dims: Dims):
        super().__init__()
        if cfg.variant not in VARIANTS:
            raise ValueError(f"unknown MARNet variant {cfg.variant!r}; choose {', '.join(VARIANTS)}")
        self.cfg = cfg
        self.schedule = NoiseSchedule(cfg.diffusion.schedule)
        uses = {"ema": cfg.variant in ("ema", "full"), "cdr": cfg.variant in ("cdr", "full")}
        self.ema = AlignedClassifier(cfg.ema, dims) if uses["ema"] else None
        self.cdr = CDRBranch(cfg, dims) if uses["cdr"] else None
        self.mlp = MLPControl(dims, cfg.diffusion.hidden, cfg.diffusion.layers, cfg.alpha2,
                              cfg.gamma) if cfg.variant == "mlp" else None
        self.fusion = FusionHead(cfg.fusion, self.ema.d, dims.text, dims.classes) \
            if cfg.variant == "full" else None

    # ------------------------------------------------------------------ prediction

    def predict(self, visual: torch.Tensor, generator: torch.Generator | None = None,
                chunk_rows: int = 8192) -> torch.Tensor:
        """Class logits from visual features alone; diffusion variants average S samples."""
        if self.cfg.variant == "ema":
            return self.ema.predict(visual)
        if self.cfg.variant == "mlp":
            return self.mlp.predict(visual)
        name = "cdr_logits" if self.cfg.variant == "cdr" else "fusion_logits"
        logits = 0.0
        samples = max(1, self.cfg.diffusion.test_samples)
        for _ in range(samples):
            logits = logits + self.representations(visual, generator, chunk_rows)[name]
        return logits / samples

    def representations(self, visual: torch.Tensor, generator: torch.Generator | None = None,
                        chunk_rows: int = 8192) -> dict[str, torch.Tensor]:
        """One image-only pass through every branch the variant has (one ``x_CDR`` chain):
        features ``mlp_map`` and ``x_cdr``, logits ``ema_logits`` (Eq. 13's classifier on
        ``x_EMA``), ``mlp_logits``, ``cdr_logits`` and ``fusion_logits`` (the prediction of the
        full model), each present when the variant has the branch (figures, diagnostics)."""
        out: dict[str, torch.Tensor] = {}
        if self.ema is not None:
            out["ema_logits"] = self.ema.predict(visual)
        if self.mlp is not None:
            out["mlp_map"] = self.mlp.mlp(visual)
            out["mlp_logits"] = self.mlp.classifier(out["mlp_map"])
        if self.cdr is not None:
            out["x_cdr"] = self.cdr.generate(visual, self.schedule_on(visual.device), generator,
                                             chunk_rows)
            out["cdr_logits"] = self.cdr.classifier(out["x_cdr"])
            if self.fusion is not None:
                out["fusion_logits"] = self.fusion(self.ema.embed(visual), out["x_cdr"])
        return out

    # ------------------------------------------------------------------ training

    def stages(self, train: SplitData, val: SplitData, ctx: TrainContext) -> list[Stage]:
        cfg = self.cfg
        if cfg.variant == "ema":
            return self.ema.stages(train, val, ctx)
        labels = val["label"]
        if cfg.variant == "mlp":
            return [Stage("mlp", [self.mlp], self.mlp.loss, {"mlp": (
                [self.mlp], val_top1(lambda: self.mlp.predict(val["visual"]), labels))})]
        schedule = self.schedule_on(ctx.device)
        d = cfg.diffusion

        def val_x_cdr() -> torch.Tensor:
            return self.cdr.generate(val["visual"], schedule, ctx.eval_generator(),
                                     ctx.chunk_rows, d.val_sampler, d.val_steps)

        def loss_a(batch: Batch):
            total, parts, x0_hat = self.cdr.loss(batch, schedule, ctx.generator)
            if self.ema is not None:
                ema_loss, ema_parts = self.ema.loss(batch)
                total, parts = total + ema_loss, {**parts, **ema_parts}
            if cfg.joint and self.fusion is not None:
                fused = F.cross_entropy(self.fusion(self.ema.embed(batch["visual"]), x0_hat),
                                        batch["label"])
                total, parts = total + fused, {**parts, "fusion_ce": fused.detach()}
            return total, parts

        modules: list[nn.Module] = [m for m in (self.ema, self.cdr) if m is not None]
        select = {"cdr": ([self.cdr], val_top1(lambda: self.cdr.classifier(val_x_cdr()), labels))}
        if self.ema is not None:
            select["ema"] = ([self.ema], val_top1(lambda: self.ema.predict(val["visual"]), labels))
        if cfg.joint and self.fusion is not None:
            modules.append(self.fusion)
            select = {"all": (modules, val_top1(
                lambda: self.fusion(self.ema.embed(val["visual"]), val_x_cdr()), labels))}
        stages = [Stage("ema+cdr" if self.ema is not None else "cdr", modules, loss_a, select)]
        if self.fusion is not None and not cfg.joint:
            stages.append(self._fusion_stage(train, val, ctx, schedule))
        return stages

    def _fusion_stage(self, train: SplitData, val: SplitData, ctx: TrainContext,
                      schedule: NoiseSchedule) -> Stage:
        """Stage (b): EMA and CDR frozen; the fusion classifier learns on sampled ``x_CDR``.

        Its ``prepare`` samples K ``x_CDR`` per train image (row state ``x_cdr_draws``,
        ``[N, K, D]``, beside the frozen ``x_ema``); each batch row trains on one of its K
        draws, picked at random. Validation uses one draw per val image (fixed eval noise).
        """
        cfg = self.cfg
        val_inputs: dict[str, torch.Tensor] = {}

        def prepare() -> RowState:
            with torch.no_grad():
                draws = torch.stack([
                    self.cdr.generate(train["visual"], schedule, ctx.generator, ctx.chunk_rows)
                    for _ in range(max(1, cfg.fusion_samples))], dim=1)
                val_inputs["x_cdr"] = self.cdr.generate(val["visual"], schedule,
                                                        ctx.eval_generator(), ctx.chunk_rows)
                val_inputs["x_ema"] = self.ema.embed(val["visual"])
                rows = {"x_cdr_draws": draws, "x_ema": self.ema.embed(train["visual"])}
            if cfg.fusion_init == "branches":
                self.fusion.init_from_branches(self.ema.classifier, self.cdr.classifier)
            return rows

        def loss_b(batch: Batch):
            draws = batch["x_cdr_draws"]
            k = torch.randint(0, draws.shape[1], (len(draws),), device=draws.device,
                              generator=ctx.generator)
            rows = torch.arange(len(draws), device=draws.device)
            logits = self.fusion(batch["x_ema"], draws[rows, k])
            ce = F.cross_entropy(logits, batch["label"])
            return ce, {"fusion_ce": ce.detach()}

        metric = val_top1(lambda: self.fusion(val_inputs["x_ema"], val_inputs["x_cdr"]),
                          val["label"])
        return Stage("fusion", [self.fusion], loss_b, {"fusion": ([self.fusion], metric)},
                     epochs=cfg.fusion_epochs, prepare=prepare, fields=("label",))
