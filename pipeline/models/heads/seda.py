"""SeDA (arXiv 2505.05721, IJCAI 2025), **reconstructed from the abstract** (methods §2.3 [R]).

Only SeDA's title block and abstract are public. The abstract names the parts (a Diffusion-
Controlled Semantic Learner, a Diffusion-Controlled Semantic Translator, a Progressive Feature
Interaction Network, bi-stage training); every equation below is our reconstruction, not the
paper's, and every choice is a configuration knob.

- DSL (R-1): conditional diffusion with target ``z_0 = c_y`` (the exact train-split centre of
  the standardised visual features of class ``y``), conditioned on ``x_v``, with MARNet's
  x0-predicting denoiser family. Loss ``MSE(D(z_t, t, x_v), c_y) + lambda_c *
  CE(-||z_hat_0 - c_k||^2 / tau_c, y)`` (variant A), plus ``lambda_h * MSE(P_h h_t, c_y)`` on
  the denoiser's interactive feature ``h_t`` (variant B, off by default). The semantic feature
  ``z`` is the DSL reverse chain from ``N(0, I)`` given ``x_v`` (DDIM, eta = 0).
- DST + PFIN (R-2): conditional diffusion on the text feature, conditioned on the frozen ``z``.
  At every step PFIN maps ``z`` toward the text side: ``m_t = P z + g_t * U([P z ; s_t ;
  emb(t)])``, ``g_t = sigmoid(G([...]))``, and the DST denoiser ``H`` predicts
  ``s_hat_0 = H([m_t ; s_t ; emb(t)])``. Loss ``MSE(s_hat_0, x_s) + lambda_s *
  CE(C_f([m_t ; s_hat_0]), y)``. Recurrent option: ``m_{t-1} = m_t + g_t * U([m_t ; s_t ;
  emb(t)])`` from ``m_T = P z``, trained by unrolling K consecutive steps of the test-time grid.
- Staged training (R-3): DSL, then DSL frozen and ``z`` generated once per train/val row, then
  DST + PFIN + ``C_f``; optionally (``dst.refit_samples`` > 0) a third stage refits ``C_f`` on
  sampled chains, as MARNet's fusion stage does (methods §3.14). Inference (R-4) is
  image-only: ``x_v -> z -> DST chain with PFIN at every reverse step -> C_f([m_1 ; s_hat_0])``,
  optionally averaged over S samples.

Variants (methods §2.4): ``full``; ``one-step`` (an MLP maps ``x_v`` to the text space with
MSE + CE: the status quo the abstract criticises, MARNet's +MLP control); ``dst-only``
(``z := x_v``, no stage 1); ``dsl-only`` (classify ``z`` by its distances to the class
centres); ``no-pfin`` (``m_t := P z``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import feature_mse
from ..schedule import NoiseSchedule
from .common import (
    MLP,
    ConditionalDenoiser,
    ProjectionEncoder,
    ScheduleOwner,
    row_chunks,
    sinusoidal_embedding,
    val_top1,
)
from .contract import Batch, Dims, RowState, SplitData, Stage, TrainContext
from .diffusion import DiffusionConfig, MLPControl, generate_chunked

VARIANTS = ("full", "one-step", "dst-only", "dsl-only", "no-pfin")
CLASSIFIER_INPUTS = ("m+s", "v+m+s", "s")  # C_f input (methods §3.24)
CROSS_FIT_FOLDS = 5  # dsl.cross_fit's default where stage 2 trains on z (README, SeDA)


@dataclass
class DSLConfig(DiffusionConfig):
    """Stage 1, the Diffusion-Controlled Semantic Learner (R-1; defaults R-5)."""

    sampler: str = "ddim"  # z = DDIM chain, eta = 0 (deterministic given the start noise)
    lambda_c: float = 0.1  # prototype CE weight (variant A)
    # prototype temperature on standardised features; None: the semantic dim d_z (squared
    # distances per dimension), the end-to-end default (README, SeDA)
    tau_c: float | None = 1.0
    lambda_h: float = 0.0  # > 0 adds variant B: MSE(P_h h_t, c_y) on the interactive feature
    # w > 0 adds w * CE(W x_v, y), a linear classifier on the visual feature trained with the
    # DSL (R-3 step 1's visual-only head). End to end it gives the backbone the class signal
    # the centre regression lacks (README, SeDA); on a cache it changes no other weight
    visual_ce: float = 0.0
    # a in [0, 1]: the DSL's target is c_y + a (x_v - c_y) (stop-gradient), 0 the class centre
    # of R-1, 1 the visual feature itself; a > 0 keeps some of each image's own variation in z
    target_mix: float = 0.0
    epochs: int | None = None  # None: the trainer's epochs
    # m of the running class centres c_k <- m c_k + (1 - m) mean_batch(x_v | y = k), used when
    # the features move (a backbone trained with the head, R-1 and methods §3.22)
    centre_momentum: float = 0.9
    # K > 1: stage 2 trains on out-of-fold z. K more DSLs, each fitted on the train rows
    # outside one of K class-stratified folds, give the z of that fold's rows; the DSL fitted
    # on all train rows gives val and test z (a model meeting rows it never saw, as at train).
    # None: CROSS_FIT_FOLDS where a later stage trains on the DSL's z (the staged full and
    # no-pfin), else 1; chosen on validation (README, SeDA), 1 is the reconstruction as written
    cross_fit: int | None = None


@dataclass
class DSTConfig(DiffusionConfig):
    """Stage 2, the Diffusion-Controlled Semantic Translator: ``H`` and ``C_f`` (R-2, R-4)."""

    sampler: str = "ddim"
    layers: int = 2  # H is a 2-layer MLP
    lambda_s: float = 1.0  # CE weight of C_f
    # m+s: [m ; s_hat_0] (R-2 as written) | v+m+s: [x_v' ; m ; s_hat_0] | s. v+m+s and the
    # refit were chosen on validation (README, SeDA); m+s and 0 are the reconstruction as written
    classifier_input: str = "v+m+s"
    refit_samples: int = 4  # K > 0: then refit C_f on K sampled chains per train row
    epochs: int | None = None
    # S chains averaged at test (R-4's option against the top-5 collapse): on the demo cache,
    # val top-1 63.3 -> 66.9 and test top-5 92.5 -> 94.8 over 3 seeds (README, SeDA)
    test_samples: int = 4


@dataclass
class PFINConfig:
    """The Progressive Feature Interaction Network (R-2)."""

    hidden: int | None = None  # width of U; None: the DST width
    update_layers: int = 2  # U is a 2-layer MLP
    recurrent: bool = False  # m_{t-1} = m_t + g_t * U([m_t ; s_t ; emb(t)])
    unroll: int = 4  # consecutive steps unrolled per training draw when recurrent


@dataclass
class SeDAConfig:
    """SeDA (reconstructed from the abstract, methods §2.3-2.4 [R]); ``d_z = d_v``
    (methods §3.23)."""

    variant: str = "full"  # full | one-step | dst-only | dsl-only | no-pfin
    dsl: DSLConfig = field(default_factory=DSLConfig)
    dst: DSTConfig = field(default_factory=DSTConfig)
    pfin: PFINConfig = field(default_factory=PFINConfig)
    # train DSL and DST + PFIN + C_f in one stage (R-3's joint alternative): DST is conditioned
    # on the DSL's one-step estimate z_hat_0 of the same draw, with gradients through it, so
    # DST's text loss reaches the DSL (and, end to end, the backbone)
    joint: bool = False

    def __post_init__(self) -> None:
        if self.joint and self.variant not in ("full", "no-pfin"):
            raise ValueError(f"joint applies to the variants with both stages (full, no-pfin), "
                             f"not {self.variant!r}")
        if self.dsl.tau_c is not None and self.dsl.tau_c <= 0:
            raise ValueError(f"dsl.tau_c is a temperature, > 0 (or none: the semantic dim); "
                             f"got {self.dsl.tau_c}")
        if self.dsl.visual_ce < 0:
            raise ValueError(f"dsl.visual_ce is a loss weight, >= 0; got {self.dsl.visual_ce}")
        if not 0.0 <= self.dsl.target_mix <= 1.0:
            raise ValueError(f"dsl.target_mix mixes the class centre and x_v, in [0, 1]; got "
                             f"{self.dsl.target_mix}")
        if self.dsl.cross_fit is None:
            return
        if self.dsl.cross_fit < 1:
            raise ValueError(f"dsl.cross_fit must be >= 1, got {self.dsl.cross_fit}")
        if self.dsl.cross_fit > 1 and not self.stage_two_reads_z:
            raise ValueError("dsl.cross_fit feeds stage 2 out-of-fold z: it applies to the "
                             "staged variants with both stages (full, no-pfin), not "
                             f"{'joint' if self.joint else repr(self.variant)}")

    @property
    def stage_two_reads_z(self) -> bool:
        """Whether a stage after the DSL's trains on its ``z`` (the staged full, no-pfin)."""
        return not self.joint and self.variant in ("full", "no-pfin")

    @property
    def cross_fit_folds(self) -> int:
        """``dsl.cross_fit`` resolved: the value set, else ``CROSS_FIT_FOLDS`` where stage 2
        reads ``z`` and 1 (no cross-fitting) where nothing does."""
        if self.dsl.cross_fit is not None:
            return self.dsl.cross_fit
        return CROSS_FIT_FOLDS if self.stage_two_reads_z else 1


def class_centres(features: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``c_k = mean{x^i : y_i = k}`` (R-1, methods §3.22); zero for a class with no rows."""
    sums = features.new_zeros(classes, features.shape[1]).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=classes).clamp(min=1).to(features.dtype)
    return sums / counts[:, None]


def prototype_logits(z: torch.Tensor, centres: torch.Tensor, tau: float) -> torch.Tensor:
    """``-||z - c_k||^2 / tau_c`` for every class k (the DSL prototype CE of R-1)."""
    sq_dist = (z.pow(2).sum(1, keepdim=True) - 2 * z @ centres.T
               + centres.pow(2).sum(1)[None, :])
    return -sq_dist / tau


def reverse_timesteps(schedule: NoiseSchedule, method: str, steps: int) -> list[int]:
    """The timesteps a test-time chain visits, T first: every step (ddpm) or the DDIM grid."""
    if method == "ddim":
        return schedule.ddim_timesteps(steps)
    return list(range(schedule.T, 0, -1))


class SemanticLearner(ScheduleOwner):
    """DSL (R-1): ``D_phi(z_t, t, x_v) -> z_hat_0`` toward the class centre ``c_y``."""

    def __init__(self, cfg: DSLConfig, dims: Dims):
        super().__init__()
        self.cfg = cfg
        self.dim = dims.visual
        self.schedule = NoiseSchedule(cfg.schedule)
        self.denoiser = ConditionalDenoiser(dims.visual, dims.visual, cfg.hidden, cfg.t_dim,
                                            cfg.layers)
        self.register_buffer("centres", torch.zeros(dims.classes, dims.visual))
        self.hidden_map = nn.Linear(cfg.hidden, dims.visual) if cfg.lambda_h > 0 else None  # P_h
        self.visual_head = nn.Linear(dims.visual, dims.classes) if cfg.visual_ce > 0 else None
        self.temperature = float(dims.visual if cfg.tau_c is None else cfg.tau_c)  # tau_c

    @torch.no_grad()
    def fit_centres(self, visual: torch.Tensor, labels: torch.Tensor) -> None:
        """Exact train-split centres of the (frozen, standardised) visual features
        (methods §3.22)."""
        self.centres.copy_(class_centres(visual, labels, len(self.centres)))

    @torch.no_grad()
    def update_centres(self, visual: torch.Tensor, labels: torch.Tensor) -> None:
        """Running centres for moving features (R-1): ``c_k <- m c_k + (1 - m) mean_batch(x_v |
        y = k)`` for the classes in the batch; a class seen for the first time (its centre is
        still the zero vector it starts as) takes its batch mean."""
        classes = len(self.centres)
        present = torch.bincount(labels, minlength=classes) > 0
        seen = self.centres.abs().sum(dim=1) > 0
        batch_centres = class_centres(visual.float(), labels, classes)
        keep = torch.where(seen, self.cfg.centre_momentum, 0.0)[:, None]
        updated = keep * self.centres + (1 - keep) * batch_centres
        self.centres.copy_(torch.where(present[:, None], updated, self.centres))

    def target(self, visual: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The DSL's regression target: the class centre ``c_y`` (R-1), or with
        ``target_mix = a`` the stop-gradient ``c_y + a (x_v - c_y)``."""
        centres = self.centres[labels]
        if self.cfg.target_mix == 0:
            return centres
        return centres + self.cfg.target_mix * (visual.detach().to(centres.dtype) - centres)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Prototype logits of the semantic feature (the ``dsl-only`` prediction)."""
        return prototype_logits(z, self.centres, self.temperature)

    def loss(self, batch: Batch, schedule: NoiseSchedule,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``MSE(z_hat_0, c_y) + lambda_c * CE(-||z_hat_0 - c_k||^2 / tau_c, y)``
        ``[+ lambda_h * MSE(P_h h_t, c_y)] [+ visual_ce * CE(W x_v, y)]`` (R-1, variants A and
        B; R-3 step 1's visual-only head); ``c_y`` is :meth:`target`."""
        total, parts, _ = self.loss_and_estimate(batch, schedule, generator)
        return total, parts

    def loss_and_estimate(self, batch: Batch, schedule: NoiseSchedule,
                          generator: torch.Generator
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`loss` and the one-step estimate ``z_hat_0`` of the draw (with gradients)."""
        visual, labels = batch["visual"], batch["label"]
        target = self.target(visual, labels)
        t = schedule.sample_timesteps(len(visual), visual.device, generator)
        noise = torch.randn(target.shape, device=visual.device, generator=generator)
        z_t = schedule.add_noise(target, noise, t)
        z_hat = self.denoiser(z_t, t, visual)
        mse = feature_mse(z_hat, target)
        proto = F.cross_entropy(self.classify(z_hat), labels)
        total = mse + self.cfg.lambda_c * proto
        parts = {"dsl_mse": mse.detach(), "dsl_proto_ce": proto.detach()}
        if self.hidden_map is not None:
            hidden = self.hidden_map(self.denoiser.interactive_features(z_t, t, visual))
            hidden_mse = feature_mse(hidden, target)
            total = total + self.cfg.lambda_h * hidden_mse
            parts["dsl_hidden_mse"] = hidden_mse.detach()
        if self.visual_head is not None:
            visual_ce = F.cross_entropy(self.visual_head(visual), labels)
            total = total + self.cfg.visual_ce * visual_ce
            parts["dsl_visual_ce"] = visual_ce.detach()
        return total, parts, z_hat

    def generate(self, visual: torch.Tensor, generator: torch.Generator | None, chunk_rows: int,
                 method: str | None = None, steps: int | None = None) -> torch.Tensor:
        """``z = DSL_sample(x_v)``: the reverse chain from ``N(0, I)`` given ``x_v`` (R-1)."""
        cfg = self.cfg
        return generate_chunked(self.schedule_on(visual.device), self.denoiser, visual,
                                self.dim, method or cfg.sampler, steps or cfg.steps, cfg.eta,
                                generator, chunk_rows)


class PFIN(nn.Module):
    """Progressive Feature Interaction Network with the DST denoiser ``H`` (R-2).

    ``m_t = base + g_t * U([base ; s_t ; emb(t)])``, ``g_t = sigmoid(G([base ; s_t ; emb(t)]))``,
    ``s_hat_0 = H([m_t ; s_t ; emb(t)])``, where ``base = P z`` (non-recurrent) or the previous
    ``m`` (recurrent). Without interaction (``no-pfin``) ``m_t = P z``. ``H`` is a
    :class:`ConditionalDenoiser` on ``[s_t ; m_t ; emb(t)]`` (the same inputs, reordered).
    """

    def __init__(self, semantic_dim: int, text_dim: int, dst: DSTConfig, cfg: PFINConfig,
                 interact: bool):
        super().__init__()
        self.t_dim = dst.t_dim
        context_dim = 2 * text_dim + dst.t_dim
        self.project = nn.Linear(semantic_dim, text_dim)  # P
        self.update = MLP(context_dim, cfg.hidden or dst.hidden, text_dim,
                          cfg.update_layers) if interact else None  # U
        self.gate_layer = nn.Linear(context_dim, text_dim) if interact else None  # G
        self.denoiser = ConditionalDenoiser(text_dim, text_dim, dst.hidden, dst.t_dim,
                                            dst.layers)  # H

    def _context(self, base: torch.Tensor, s_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([base, s_t, sinusoidal_embedding(t, self.t_dim).to(s_t.dtype)], dim=-1)

    def gate(self, base: torch.Tensor, s_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``g_t = sigmoid(G([base ; s_t ; emb(t)]))``, one gate per text dimension."""
        return torch.sigmoid(self.gate_layer(self._context(base, s_t, t)))

    def mapped(self, base: torch.Tensor, s_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The mapped feature ``m_t`` of step ``t`` (``base`` itself without interaction)."""
        if self.update is None:
            return base
        context = self._context(base, s_t, t)
        return base + torch.sigmoid(self.gate_layer(context)) * self.update(context)

    def forward(self, base: torch.Tensor, s_t: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m_t, s_hat_0)`` for one reverse step."""
        mapped = self.mapped(base, s_t, t)
        return mapped, self.denoiser(s_t, t, mapped)


class TranslatorChain:
    """PFIN + DST as the denoise callable of :meth:`NoiseSchedule.sample`, one chain of rows.

    Each call runs PFIN at that reverse step and keeps ``m_t`` in :attr:`mapped`, so after the
    chain :attr:`mapped` is ``m_1`` and the chain's output is ``s_hat_0`` of the last step.
    """

    def __init__(self, pfin: PFIN, z: torch.Tensor, recurrent: bool):
        self.pfin = pfin
        self.recurrent = recurrent
        self.start = pfin.project(z)  # P z (= m_T when recurrent)
        self.mapped = self.start

    def __call__(self, s_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        base = self.mapped if self.recurrent else self.start
        self.mapped, s_hat = self.pfin(base, s_t, t)
        return s_hat


class SemanticTranslator(ScheduleOwner):
    """DST + PFIN + ``C_f`` (R-2): from the semantic feature ``z`` to the text distribution."""

    def __init__(self, cfg: SeDAConfig, dims: Dims, interact: bool):
        super().__init__()
        dst = cfg.dst
        if dst.classifier_input not in CLASSIFIER_INPUTS:
            raise ValueError(f"unknown dst.classifier_input {dst.classifier_input!r}; choose "
                             f"{', '.join(CLASSIFIER_INPUTS)}")
        self.cfg = dst
        self.pfin_cfg = cfg.pfin
        self.text_dim = dims.text
        self.schedule = NoiseSchedule(dst.schedule)
        self.pfin = PFIN(dims.visual, dims.text, dst, cfg.pfin, interact)
        self.visual_encoder = ProjectionEncoder(dims.visual, dims.text) \
            if dst.classifier_input == "v+m+s" else None  # x_v' = g(E_v x_v), as MARNet's EMA
        pieces = len(dst.classifier_input.split("+"))
        self.classifier = nn.Linear(pieces * dims.text, dims.classes)  # C_f

    def classify(self, mapped: torch.Tensor, s_hat: torch.Tensor,
                 visual: torch.Tensor) -> torch.Tensor:
        """``C_f`` on ``[m ; s_hat_0]``, ``[x_v' ; m ; s_hat_0]`` or ``s_hat_0``
        (methods §3.24)."""
        pieces = {"m": mapped, "s": s_hat}
        if self.visual_encoder is not None:
            pieces["v"] = self.visual_encoder(visual)
        return self.classifier(torch.cat([pieces[p] for p in self.cfg.classifier_input.split("+")],
                                         dim=-1))

    def _training_steps(self, rows: int, schedule: NoiseSchedule, device: torch.device,
                        generator: torch.Generator) -> list[torch.Tensor]:
        """One uniform ``t`` per row, or (recurrent) K consecutive test-grid steps per row."""
        if not self.pfin_cfg.recurrent:
            return [schedule.sample_timesteps(rows, device, generator)]
        grid = torch.tensor(reverse_timesteps(schedule, self.cfg.sampler, self.cfg.steps),
                            device=device)
        unroll = max(1, min(self.pfin_cfg.unroll, len(grid)))
        start = torch.randint(0, len(grid) - unroll + 1, (rows,), device=device,
                              generator=generator)
        return [grid[start + k] for k in range(unroll)]

    def loss(self, z: torch.Tensor, batch: Batch, schedule: NoiseSchedule,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``MSE(s_hat_0, x_s) + lambda_s * CE(C_f([m_t ; s_hat_0]), y)`` (R-2), averaged over
        the unrolled steps when PFIN is recurrent. A recurrent window starts from ``m = P z``
        wherever it starts on the grid (the test chain has that state only at T), and its
        steps share one noise draw."""
        text, labels = batch["text"], batch["label"]
        noise = torch.randn(text.shape, device=text.device, generator=generator)
        chain = TranslatorChain(self.pfin, z, self.pfin_cfg.recurrent)
        steps = self._training_steps(len(text), schedule, text.device, generator)
        mse = ce = text.new_zeros(())
        for t in steps:
            s_hat = chain(schedule.add_noise(text, noise, t), t)
            mse = mse + feature_mse(s_hat, text)
            ce = ce + F.cross_entropy(self.classify(chain.mapped, s_hat, batch.get("visual")),
                                      labels)
        mse, ce = mse / len(steps), ce / len(steps)
        return mse + self.cfg.lambda_s * ce, {"dst_mse": mse.detach(), "dst_ce": ce.detach()}

    def translate(self, z: torch.Tensor, generator: torch.Generator | None, chunk_rows: int,
                  method: str | None = None, steps: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m_1, s_hat_0)``: the DST reverse chain from ``N(0, I)`` with PFIN at every step
        (R-4), ``chunk_rows`` rows at a time."""
        cfg = self.cfg
        schedule = self.schedule_on(z.device)
        mapped, generated = [], []
        for rows in row_chunks(z.shape[0], chunk_rows):
            chain = TranslatorChain(self.pfin, z[rows], self.pfin_cfg.recurrent)
            generated.append(schedule.sample(chain, tuple(chain.start.shape), z.device,
                                             method or cfg.sampler, steps or cfg.steps, cfg.eta,
                                             generator))
            mapped.append(chain.mapped)
        if not generated:
            empty = z.new_zeros(0, self.text_dim)
            return empty, empty
        return torch.cat(mapped), torch.cat(generated)


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """The fold (0..K-1) of every row: each class's rows shuffled with ``seed`` and dealt out
    in turn, so every fold holds about 1/K of every class."""
    generator = torch.Generator().manual_seed(seed)
    cpu = labels.cpu()
    fold = torch.empty_like(cpu)
    for label in cpu.unique():
        rows = (cpu == label).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        fold[rows] = torch.arange(len(rows)) % folds
    return fold.to(labels.device)


@dataclass
class Fold:
    """One cross-fit DSL: fitted on ``fitted`` train rows, it gives the z of ``held_out``."""

    model: "SemanticLearner"
    fitted: torch.Tensor
    held_out: torch.Tensor


class SeDA(nn.Module):
    """The SeDA head (reconstructed from the abstract); ``variant`` picks the ablation of
    methods §2.4."""

    def __init__(self, cfg: SeDAConfig, dims: Dims):
        super().__init__()
        if cfg.variant not in VARIANTS:
            raise ValueError(f"unknown SeDA variant {cfg.variant!r}; choose {', '.join(VARIANTS)}")
        self.cfg = cfg
        uses_dsl = cfg.variant in ("full", "dsl-only", "no-pfin")
        uses_dst = cfg.variant in ("full", "dst-only", "no-pfin")
        self.dsl = SemanticLearner(cfg.dsl, dims) if uses_dsl else None
        self.dst = SemanticTranslator(cfg, dims, interact=cfg.variant != "no-pfin") \
            if uses_dst else None
        self.one_step = MLPControl(dims, cfg.dsl.hidden, cfg.dsl.layers, cfg.dst.lambda_s) \
            if cfg.variant == "one-step" else None

    # ------------------------------------------------------------------ inference

    def semantic(self, visual: torch.Tensor, generator: torch.Generator | None, chunk_rows: int,
                 method: str | None = None, steps: int | None = None) -> torch.Tensor:
        """The semantic feature ``z``: the DSL chain, or ``x_v`` itself (``dst-only``)."""
        if self.dsl is None:
            return visual
        return self.dsl.generate(visual, generator, chunk_rows, method, steps)

    @torch.no_grad()
    def representations(self, visual: torch.Tensor, generator: torch.Generator | None = None,
                        chunk_rows: int = 8192) -> dict[str, torch.Tensor]:
        """One image-only pass: ``z`` (DSL), ``m`` and ``s_hat_0`` (DST + PFIN), ``logits``;
        the ``one-step`` variant gives its ``mapped`` feature."""
        if self.one_step is not None:
            mapped = self.one_step.mlp(visual)
            return {"mapped": mapped, "logits": self.one_step.classifier(mapped)}
        z = self.semantic(visual, generator, chunk_rows)
        out = {"z": z} if self.dsl is not None else {}
        if self.dst is None:
            return {**out, "logits": self.dsl.classify(z)}
        mapped, s_hat = self.dst.translate(z, generator, chunk_rows)
        return {**out, "m": mapped, "s_hat_0": s_hat,
                "logits": self.dst.classify(mapped, s_hat, visual)}

    def predict(self, visual: torch.Tensor, generator: torch.Generator | None = None,
                chunk_rows: int = 8192) -> torch.Tensor:
        """Class logits from visual features alone, averaged over S chains (R-4)."""
        samples = max(1, (self.cfg.dst if self.dst is not None else self.cfg.dsl).test_samples)
        logits = 0.0
        for _ in range(samples):
            logits = logits + self.representations(visual, generator, chunk_rows)["logits"]
        return logits / samples

    def split_diagnostics(self, visual: torch.Tensor, labels: torch.Tensor,
                          generator: torch.Generator | None = None,
                          chunk_rows: int = 8192) -> dict[str, float]:
        """``z_top1``: how well the semantic feature alone classifies a split (its nearest
        class centre), the stage-1 accuracy the train/test gap of ``z`` is read from."""
        if self.dsl is None:
            return {}
        return {"z_top1": self._z_top1(self.semantic(visual, generator, chunk_rows), labels)}

    # ------------------------------------------------------------------ training

    def stages(self, train: SplitData, val: SplitData, ctx: TrainContext) -> list[Stage]:
        if self.one_step is not None:
            return [Stage("one-step", [self.one_step], self.one_step.loss, {"one-step": (
                [self.one_step], val_top1(lambda: self.one_step.predict(val["visual"]),
                                          val["label"]))})]
        stages = []
        semantic: dict[str, torch.Tensor] = {}  # z of train and val, once stage 2 made them
        folds = self._cross_fit_folds(train, ctx)
        if self.cfg.joint:
            stages.append(self._joint_stage(train, val, ctx))
        if self.dsl is not None and not self.cfg.joint:
            stages.append(self._dsl_stage(train, val, ctx))
            stages += [self._dsl_stage(train, val, ctx, fold.model, fold.fitted, f"dsl-fold{k}")
                       for k, fold in enumerate(folds)]
        if self.dst is not None and not self.cfg.joint:
            stages.append(self._dst_stage(train, val, ctx, semantic, folds))
        if self.dst is not None and self.cfg.dst.refit_samples > 0:
            stages.append(self._classifier_stage(train, val, ctx, semantic))
        return stages

    def _dsl_stage(self, train: SplitData, val: SplitData, ctx: TrainContext,
                   dsl: "SemanticLearner | None" = None, rows: torch.Tensor | None = None,
                   name: str = "dsl") -> Stage:
        """Stage 1: a DSL (the head's own, or a cross-fit fold's, fitted on ``rows``);
        selected on val nearest-centre accuracy of ``z`` (a cheap chain)."""
        dsl, cfg = dsl or self.dsl, self.cfg.dsl
        schedule = dsl.schedule_on(ctx.device)

        def val_logits() -> torch.Tensor:
            return dsl.classify(dsl.generate(val["visual"], ctx.eval_generator(), ctx.chunk_rows,
                                             cfg.val_sampler, cfg.val_steps))

        return Stage(name, [dsl], lambda batch: self._dsl_loss(batch, schedule, ctx, dsl)[:2],
                     {name: ([dsl], val_top1(val_logits, val["label"]))}, epochs=cfg.epochs,
                     prepare=self._centres_preparer(train, ctx, dsl, rows),
                     fields=("visual", "label"), train_rows=rows)

    def _centres_preparer(self, train: SplitData, ctx: TrainContext,
                          dsl: "SemanticLearner | None" = None, rows: torch.Tensor | None = None
                          ) -> Callable[[], None] | None:
        """Exact centres of the train rows a DSL is fitted on (all, or a cross-fit's
        ``rows``), fitted once (cached features; the centres are weights of the DSL, saved
        with it); none when the features move: :meth:`_dsl_loss` keeps running centres then."""
        if ctx.moving_features:
            return None
        dsl = dsl or self.dsl

        def fit() -> None:
            visual, labels = train["visual"], train["label"]
            if rows is not None:
                visual, labels = visual[rows], labels[rows]
            dsl.fit_centres(visual, labels)

        return fit

    def _dsl_loss(self, batch: Batch, schedule: NoiseSchedule, ctx: TrainContext,
                  dsl: "SemanticLearner | None" = None):
        """A DSL's loss of one batch (running centres first when the features move)."""
        dsl = dsl or self.dsl
        if ctx.moving_features:
            dsl.update_centres(batch["visual"].detach(), batch["label"])
        return dsl.loss_and_estimate(batch, schedule, ctx.generator)

    def _cross_fit_folds(self, train: SplitData, ctx: TrainContext) -> list["Fold"]:
        """``dsl.cross_fit`` = K > 1: K fresh DSLs, fold k's fitted on the train rows outside
        class-stratified fold k (which it gives the z of); none for K = 1. The fold models
        live only while the head trains: the saved head keeps the DSL fitted on all rows."""
        k = self.cfg.cross_fit_folds
        if k == 1 or self.dsl is None:
            return []
        fold_of_row = stratified_folds(train["label"], k, ctx.eval_seed)
        dims = Dims(self.dsl.dim, self.dsl.dim, len(self.dsl.centres))
        return [Fold(SemanticLearner(self.cfg.dsl, dims).to(ctx.device),
                     (fold_of_row != f).nonzero().flatten(), (fold_of_row == f).nonzero().flatten())
                for f in range(k)]

    def _joint_stage(self, train: SplitData, val: SplitData, ctx: TrainContext) -> Stage:
        """``joint``: ``L_DSL + L_DST`` in one stage, DST conditioned on the DSL's one-step
        ``z_hat_0`` (gradients flow through it); selected on val top-1 of the image-only
        prediction with the cheap chains of both stages."""
        dsl_schedule = self.dsl.schedule_on(ctx.device)
        dst_schedule = self.dst.schedule_on(ctx.device)

        def loss(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            dsl_loss, dsl_parts, z_hat = self._dsl_loss(batch, dsl_schedule, ctx)
            dst_loss, dst_parts = self.dst.loss(z_hat, batch, dst_schedule, ctx.generator)
            return dsl_loss + dst_loss, {**dsl_parts, **dst_parts}

        def val_logits() -> torch.Tensor:
            z = self.dsl.generate(val["visual"], ctx.eval_generator(), ctx.chunk_rows,
                                  self.cfg.dsl.val_sampler, self.cfg.dsl.val_steps)
            mapped, s_hat = self.dst.translate(z, ctx.eval_generator(), ctx.chunk_rows,
                                               self.cfg.dst.val_sampler, self.cfg.dst.val_steps)
            return self.dst.classify(mapped, s_hat, val["visual"])

        modules = [self.dsl, self.dst]
        return Stage("dsl+dst", modules, loss, {"seda": (modules, val_top1(val_logits,
                                                                           val["label"]))},
                     epochs=self.cfg.dst.epochs, prepare=self._centres_preparer(train, ctx))

    def _dst_stage(self, train: SplitData, val: SplitData, ctx: TrainContext,
                   semantic: dict[str, torch.Tensor], folds: list[Fold] = ()) -> Stage:
        """Stage 2: DSL frozen, ``z`` generated once per row (row state ``z``; kept in
        ``semantic`` for the refit stage), then DST + PFIN + ``C_f``; selected on val top-1 of
        the image-only prediction (a cheap chain). With cross-fit ``folds``, a train row's
        ``z`` comes from the fold DSL that was not fitted on it (row state ``z_fold`` names
        which). Without a DSL (``dst-only``) ``z`` is the batch's own ``x_v``, so the stage
        reads only its batch and can train through a backbone."""
        dst, cfg = self.dst, self.cfg.dst
        schedule = dst.schedule_on(ctx.device)

        def prepare() -> RowState:
            with torch.no_grad():
                state = self._train_semantic(train, ctx, folds)
                semantic["train"] = state["z"]
                semantic["val"] = self.semantic(val["visual"], ctx.eval_generator(),
                                                ctx.chunk_rows)
            return state

        def loss(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            z = batch["visual"] if self.dsl is None else batch["z"]
            return dst.loss(z, batch, schedule, ctx.generator)

        # a recurrent PFIN is trained on the test chain's grid: select it on that grid too
        val_chain = ((cfg.sampler, cfg.steps) if self.cfg.pfin.recurrent
                     else (cfg.val_sampler, cfg.val_steps))

        def val_logits() -> torch.Tensor:
            z = val["visual"] if self.dsl is None else semantic["val"]
            mapped, s_hat = dst.translate(z, ctx.eval_generator(), ctx.chunk_rows, *val_chain)
            return dst.classify(mapped, s_hat, val["visual"])

        reads_visual = self.dsl is None or dst.visual_encoder is not None
        fields = ("visual", "text", "label") if reads_visual else ("text", "label")
        name = "dst" if dst.pfin.update is None else "dst+pfin"
        def z_top1(state: RowState) -> dict[str, float]:
            return {"z_top1_train": self._z_top1(state["z"], train["label"]),
                    "z_top1_val": self._z_top1(semantic["val"], val["label"])}

        with_dsl = self.dsl is not None
        return Stage(name, [dst], loss, {name: ([dst], val_top1(val_logits, val["label"]))},
                     epochs=cfg.epochs, prepare=prepare if with_dsl else None, fields=fields,
                     diagnostics=z_top1 if with_dsl else None)

    def _z_top1(self, z: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 (%) of ``z`` read as a prediction, its nearest class centre (``dsl-only``):
        on the train rows stage 2 learns from, against val, it measures the gap cross-fitting
        closes."""
        with torch.no_grad():
            return round(100 * (self.dsl.classify(z).argmax(1) == labels).float().mean().item(), 3)

    def _train_semantic(self, train: SplitData, ctx: TrainContext, folds: list[Fold]
                        ) -> RowState:
        """``z`` of every train row: the DSL's chain, or, cross-fitted, each fold's rows
        through the fold DSL fitted without them (``z_fold``: that fold's number)."""
        if not folds:
            return {"z": self.semantic(train["visual"], ctx.generator, ctx.chunk_rows)}
        z = torch.empty_like(train["visual"])
        z_fold = torch.full((len(z),), -1, dtype=torch.long, device=z.device)
        for number, fold in enumerate(folds):
            z[fold.held_out] = fold.model.generate(train["visual"][fold.held_out],
                                                   ctx.generator, ctx.chunk_rows)
            z_fold[fold.held_out] = number
        return {"z": z, "z_fold": z_fold}

    def _semantic_features(self, train: SplitData, val: SplitData, ctx: TrainContext,
                           semantic: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` of the train and val rows: stage 2's own (generated in its ``prepare``), else
        generated now (``dst-only``: ``x_v``; ``joint``: the trained DSL's chain)."""
        if semantic:
            return semantic["train"], semantic["val"]
        return (self.semantic(train["visual"], ctx.generator, ctx.chunk_rows),
                self.semantic(val["visual"], ctx.eval_generator(), ctx.chunk_rows))

    def _classifier_stage(self, train: SplitData, val: SplitData, ctx: TrainContext,
                          semantic: dict[str, torch.Tensor]) -> Stage:
        """Optional stage 3 (``dst.refit_samples`` = K > 0): DST + PFIN frozen, ``C_f`` refitted
        with CE on K test-time chains per train row, i.e. on what it sees at test (as MARNet's
        fusion stage, methods §3.14). Stage 2 trains ``C_f`` on ``s_hat_0`` denoised from the
        noised true text, which the test-time chain never has."""
        dst, cfg = self.dst, self.cfg.dst
        modules = [m for m in (dst.classifier, dst.visual_encoder) if m is not None]
        val_chain: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def prepare() -> RowState:
            with torch.no_grad():
                train_z, val_z = self._semantic_features(train, val, ctx, semantic)
                draws = [dst.translate(train_z, ctx.generator, ctx.chunk_rows)
                         for _ in range(cfg.refit_samples)]
                val_chain["val"] = dst.translate(val_z, ctx.eval_generator(), ctx.chunk_rows)
            return {"m_draws": torch.stack([m for m, _ in draws], dim=1),
                    "s_hat_draws": torch.stack([s for _, s in draws], dim=1)}

        def loss(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            rows = torch.arange(len(batch["label"]), device=batch["label"].device)
            draw = torch.randint(0, cfg.refit_samples, (len(rows),), device=rows.device,
                                 generator=ctx.generator)
            mapped, s_hat = batch["m_draws"][rows, draw], batch["s_hat_draws"][rows, draw]
            ce = F.cross_entropy(dst.classify(mapped, s_hat, batch.get("visual")),
                                 batch["label"])
            return ce, {"refit_ce": ce.detach()}

        def val_logits() -> torch.Tensor:
            return dst.classify(*val_chain["val"], val["visual"])

        fields = ("label",) if dst.visual_encoder is None else ("visual", "label")
        return Stage("classifier", modules, loss,
                     {"classifier": (modules, val_top1(val_logits, val["label"]))},
                     epochs=cfg.epochs, prepare=prepare, fields=fields)
