"""``webdataset``: WebDataset tar shards, read in place, never unpacked (datasets §6.3).

``--root`` is a shard pattern with brace ranges (``shards/{train-{00000..00099},test-{00000..
00009}}.tar``, expanded as the ``webdataset`` package expands it), one ``.tar`` file, or a
folder (every ``.tar`` below it, in sorted path order). A shard's split is the leading word of
its file name (``train-00000.tar``), else its folder's name (``test/00000.tar``); ``--splits``
maps other names. Shards must be uncompressed tar (offsets are read positions).

A sample is the run of consecutive members that share a key (the member name up to the first
dot of its base name, suffixes lower-cased: ``webdataset``'s own grouping,
``webdataset.tariterators.base_plus_ext``). Per key:

- the image: the one member with an image suffix (``jpg``, ``png``, ``webp``...);
- the label: ``.cls`` (an integer class index), else ``--label-column`` in ``.json``;
- the text: ``.txt``, else ``--text-column`` in ``.json``, else ``--template`` over
  ``--ingredients-column`` in ``.json``.

**Reading.** Loading the dataset walks each shard's tar headers once, seeking over the member
data (``tarfile`` on the open shard), and reads only the small label and text members; each
image becomes a :class:`~pipeline.datasets.sources.TarMember`, the offset and size of its data.
The digest fingerprints each image by the rule for image files (its size and first and last
4 KiB, read at that offset), so no image is read in full before it is decoded, and decoding
reads each image once, by offset, in whichever worker or rank needs it.

**Order.** Records are the shards in pattern order (brace expansion order; sorted paths for a
folder), then the samples in tar order within each shard. The list is the same in every process
that loads the same shards, so a resumed run, a repair after ``cache verify`` and every rank of
a distributed extraction see the same rows: cache shard k holds records ``[k * rows, (k + 1) *
rows)`` of a split, whichever tar shards they come from, and the rank owning it reads just those
members by offset.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .base import DEFAULT_TEMPLATE, DatasetError, DatasetInfo
from .columns import (
    Columns,
    Sample,
    build_info,
    label_value,
    map_splits,
    require_module,
    split_of,
    text_and_ingredients,
)
from .sources import TarMember, pattern_base

LABEL_SUFFIXES = ("cls", "json", "txt")
SMALL_MEMBER_BYTES = 1 << 20  # a label or text member larger than this is refused
LAYOUT_HELP = ("webdataset layout: uncompressed .tar shards named by split (train-00000.tar, "
               "test-00000.tar) or in split folders, each sample an image (.jpg, .png...) "
               "plus .cls or .json (label) and .txt or .json (text) under one key")


def _webdataset() -> Any:
    return require_module("webdataset", "webdataset", "--dataset webdataset")


def shard_paths(root: str) -> list[Path]:
    """The shards ``root`` names (a brace pattern, a .tar file or a folder), in order."""
    wds = _webdataset()
    if Path(root).is_dir():
        shards = sorted(Path(root).rglob("*.tar"))
        if not shards:
            raise DatasetError(f"{root}: no .tar shards in this folder. {LAYOUT_HELP}")
        return shards
    shards = [Path(p) for p in wds.shardlists.expand_urls(root)]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise DatasetError(f"{missing[0]}: shard not found ({len(missing)} of the {len(shards)} "
                           f"shards {root} names are missing)")
    return shards


@dataclass
class KeyMembers:
    """The members of one sample, as the header walk found them."""

    key: str
    image: list[TarMember] = field(default_factory=list)
    small: dict[str, bytes] = field(default_factory=dict)  # cls / json / txt contents


def _check_not_compressed(shard: Path) -> None:
    with open(shard, "rb") as fh:
        magic = fh.read(6)
    if magic.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")):
        raise DatasetError(f"{shard}: a compressed tar; shards are read by offset, so they must "
                           "be plain .tar (decompress them, e.g. gunzip)")


def _end_is_clean(shard: Path, offset: int) -> bool:
    """Whether the archive really ends at ``offset`` (a zero block or the file's end), not at
    a header ``tarfile`` could not parse and took for the end."""
    with open(shard, "rb") as fh:
        fh.seek(offset)
        block = fh.read(tarfile.BLOCKSIZE)
    return not block.strip(b"\0")


def walk_members(shard: Path) -> Iterator[tuple[str, str, tarfile.TarInfo, tarfile.TarFile]]:
    """``(key, suffix, member, tar)`` per regular file member, in tar order, reading headers
    only; a corrupt or truncated shard raises a :class:`DatasetError` naming it and where."""
    base_plus_ext = _webdataset().tariterators.base_plus_ext
    _check_not_compressed(shard)
    size, last = shard.stat().st_size, "the start"
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                if member.offset_data + member.size > size:
                    raise DatasetError(f"{shard}: truncated: the file ends inside member "
                                       f"{member.name!r} ({member.offset_data + member.size - size}"
                                       " bytes missing); the shard is damaged (rewrite it)")
                key, suffix = base_plus_ext(member.name)
                last = repr(member.name)
                if member.isreg() and key is not None and not member.name.startswith("__"):
                    yield key, suffix.lower(), member, tar
            end = tar.offset
    except tarfile.ReadError as exc:
        if "unexpected end of data" in str(exc):
            raise DatasetError(f"{shard}: truncated: the file ends inside member {last}; the "
                               "shard is damaged (rewrite it)") from None
        raise DatasetError(f"{shard}: not a readable tar after {last} ({exc}). "
                           f"{LAYOUT_HELP}") from None
    if not _end_is_clean(shard, end):
        raise DatasetError(f"{shard}: corrupt tar: the header at byte {end}, after {last}, "
                           "cannot be read; the shard is damaged (rewrite it)")


def key_groups(shard: Path, image_suffixes: set[str]) -> list[KeyMembers]:
    """The shard's samples: consecutive members grouped by key, images as offsets, label and
    text members read."""
    groups: list[KeyMembers] = []
    seen: set[str] = set()
    for key, suffix, member, tar in walk_members(shard):
        if not groups or groups[-1].key != key:
            if key in seen:
                raise DatasetError(f"{shard}: key {key!r} appears again at member "
                                   f"{member.name!r}, apart from its other members; a sample's "
                                   "members must be consecutive and keys unique")
            seen.add(key)
            groups.append(KeyMembers(key))
        if suffix in image_suffixes:
            groups[-1].image.append(TarMember(shard, member.name, member.offset_data,
                                              member.size))
        elif suffix in LABEL_SUFFIXES:
            if member.size > SMALL_MEMBER_BYTES:
                raise DatasetError(f"{shard}: member {member.name!r} is {member.size:,} bytes; "
                                   f"a .{suffix} holds a label or a text")
            groups[-1].small[suffix] = tar.extractfile(member).read()
    return groups


def _json_values(group: KeyMembers, where: str) -> dict[str, Any]:
    if "json" not in group.small:
        return {}
    try:
        values = json.loads(group.small["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{where}: .json is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(values, dict):
        raise DatasetError(f"{where}: .json must hold an object, found {type(values).__name__}")
    return values


def _text(group: KeyMembers, suffix: str, where: str) -> str:
    try:
        return group.small[suffix].decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{where}: .{suffix} is not valid UTF-8 ({exc})") from None


def group_sample(group: KeyMembers, shard: Path, split: str, sample_id: str,
                 columns: Columns) -> Sample:
    """One key's sample; a missing image, label or text is an error naming shard and key."""
    where = f"{shard} key {group.key!r}"
    if len(group.image) != 1:
        found = ", ".join(m.member for m in group.image) or "none"
        raise DatasetError(f"{where}: expected one image member, found {found}")
    values = _json_values(group, where)
    if "cls" in group.small:
        label = label_value(_text(group, "cls", where), f"{where} (.cls)", "cls")
    elif columns.label in values:
        label = label_value(values[columns.label], f"{where} (.json)", columns.label)
    else:
        raise DatasetError(f"{where}: no label: no .cls member and no {columns.label!r} in "
                           f"{'its .json' if 'json' in group.small else 'a .json member'}; "
                           "add one (or name the JSON key with --label-column)")
    if "txt" in group.small:
        values = {**values, columns.text: _text(group, "txt", where)}
    text, ingredients = text_and_ingredients(values, where, columns)
    return Sample(where, split, sample_id, group.image[0], label, text, ingredients)


def load_webdataset(root: Path, template: str = DEFAULT_TEMPLATE, label_column: str = "label",
                    text_column: str = "text", ingredients_column: str = "ingredients",
                    splits: str | None = None) -> DatasetInfo:
    """The ``webdataset`` adapter (see the module docstring)."""
    pattern = str(root)
    columns = Columns(label_column, text_column, ingredients_column)
    image_suffixes = set(_webdataset().autodecode.IMAGE_EXTENSIONS)
    by_split: dict[str, list[Path]] = {}
    for shard in shard_paths(pattern):
        by_split.setdefault(split_of(shard), []).append(shard)
    mapping = map_splits(list(by_split), splits, pattern)
    base = os.path.abspath(pattern_base(pattern))
    samples = []
    for split, source in mapping.items():
        for shard in by_split[source]:
            prefix = os.path.relpath(os.path.abspath(shard), base).replace(os.sep, "/")
            samples += [group_sample(group, shard, split, f"{prefix}/{group.key}", columns)
                        for group in key_groups(shard, image_suffixes)]
    return build_info("webdataset", Path(pattern), samples, template, [], {"splits": mapping})
