"""The defaults the command line and the config dataclasses share (no heavy imports, so the
CLI reads them without loading torch): one source for each."""

DEFAULT_VISUAL = "vit_base_patch16_224"  # the papers' vision backbone (timm name)
DEFAULT_TEXT = "bert-base-uncased"  # the papers' text backbone (HF id)
DEFAULT_TEMPLATE = "Ingredients: {ingredients}."  # sentence built from an ingredient list
