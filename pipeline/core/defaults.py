"""The defaults the command line and the config dataclasses share (no heavy imports, so the
CLI reads them without loading torch): one source for each."""

DEFAULT_VISUAL = "vit_base_patch16_224"  # the papers' vision backbone (timm name)
DEFAULT_TEXT = "bert-base-uncased"  # the papers' text backbone (HF id)
DEFAULT_TEMPLATE = "Ingredients: {ingredients}."  # sentence built from an ingredient list

# Head settings sized for a CPU demo (the paper-scale defaults are in the method configs):
# a 512-wide denoiser, 2 sampled x_CDR per train image for the fusion stage, and x_CDR
# sampled by a 20-step DDIM chain (eta 0) instead of the full 100-step DDPM chain, in the
# fusion stage as at test (`marnet bench`'s ddim_vs_ddpm: the same top-1 at a fifth of the cost)
DEMO_HEAD_OVERRIDES = {"marnet": {"diffusion.hidden": 512, "fusion_samples": 2,
                                  "diffusion.sampler": "ddim", "diffusion.steps": 20}}
