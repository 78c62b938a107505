"""Reading one image of a dataset row, on demand, with errors that name the file and row.

The streaming pipeline never decodes a whole image column: it keeps an `ImageReader` over the column's raw
storage and decodes the rows a batch needs, in the DataLoader's worker processes. A cell is one of:

- a PIL image (a dataset whose image column is not a `datasets.Image` feature, e.g. after a transform);
- a `datasets.Image` storage dict ``{"bytes": ..., "path": ...}`` (bytes win; else the local file);
- a tar member reference ``{"shard": PATH, "offset": int, "size": int, "member": NAME}`` (webdataset shards,
  read by seeking to the member's data, no scan of the archive).

Cells are decoded by `vlkit.imagefile.open_image` (EXIF orientation, full decode, pixel limit) and come back in
their own mode (RGBA, P, CMYK, I;16, ...): the backbone's own transform converts them, as its library does. A
missing, truncated, zero-byte or undecodable image raises `DataError` naming where it came from.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import DataError
from ..imagefile import ImageDecodeError, open_image

TAR_REF_FIELDS = ("shard", "offset", "size", "member")


def is_tar_ref(cell: Any) -> bool:
    return isinstance(cell, dict) and all(k in cell for k in TAR_REF_FIELDS)


def is_tar_ref_feature(feature: Any) -> bool:
    """Whether a `datasets` feature is a struct of tar member references (a webdataset image column)."""
    return isinstance(feature, dict) and all(k in feature for k in TAR_REF_FIELDS)


def read_tar_member(cell: dict) -> bytes:
    """The bytes of one tar member, read at its data offset."""
    shard = cell["shard"]
    try:
        with open(shard, "rb") as fh:
            fh.seek(int(cell["offset"]))
            data = fh.read(int(cell["size"]))
    except OSError as exc:
        raise DataError(f"shard {shard}, member {cell['member']}: cannot read: {exc.strerror or exc}") from None
    if len(data) != int(cell["size"]):
        raise DataError(f"shard {shard}, member {cell['member']}: truncated ({len(data)} of {cell['size']} bytes)")
    return data


def cell_label(cell: Any) -> str:
    """Where a cell's image comes from, for messages."""
    if is_tar_ref(cell) and int(cell["offset"]) == 0:  # a whole file (`vlkit.data.mix`): no tar data starts at 0
        return f"image file {cell['shard']}"
    if is_tar_ref(cell):
        return f"shard {cell['shard']}, member {cell['member']}"
    if isinstance(cell, dict) and cell.get("path") and cell.get("bytes") is None:
        return f"image file {cell['path']}"
    return "embedded image"


def decode_cell(cell: Any, *, where: str, mode: str | None = None):
    """The decoded PIL image of one stored cell, in its own mode (or `mode`, a `datasets.Image(mode=...)` the
    column declares); DataError naming `where` and the file/member when it fails."""
    from PIL import Image

    if cell is None:
        raise DataError(f"{where}: no image")
    if isinstance(cell, Image.Image):
        im = cell
    else:
        if is_tar_ref(cell):
            data, origin = read_tar_member(cell), cell_label(cell)
        elif isinstance(cell, dict) and cell.get("bytes") is not None:
            data, origin = cell["bytes"], cell_label(cell)
        elif isinstance(cell, dict) and cell.get("path"):
            path = cell["path"]
            if not os.path.isfile(path):
                raise DataError(f"{where}: image file not found: {path}")
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except OSError as exc:
                raise DataError(f"{where}: cannot read image file {path}: {exc.strerror or exc}") from None
            origin = f"image file {path}"
        else:
            raise DataError(f"{where}: not an image cell ({type(cell).__name__})")
        if not data:
            raise DataError(f"{where}: {origin} is empty (0 bytes)")
        try:
            im = open_image(data)
        except ImageDecodeError as exc:
            raise DataError(f"{where}: cannot decode {origin}: {exc}") from None
    return im if mode is None or im.mode == mode else im.convert(mode)


class ImageReader:
    """Random access to one image column of a `datasets.Dataset`, decoding only the rows asked for.

    A mode the column's `datasets.Image` feature declares (the source's own `Image(mode=...)`) is kept.
    Picklable (DataLoader workers get a copy). `label` names the source in messages (``manifest:x.jsonl``).
    """

    def __init__(self, ds, column: str = "image", label: str | None = None):
        import datasets

        if column not in ds.column_names:
            raise DataError(f"{label or 'dataset'} has no image column {column!r}")
        feat = ds.features[column]
        self.mode = getattr(feat, "mode", None) if isinstance(feat, datasets.Image) else None
        if isinstance(feat, datasets.Image) and feat.decode:
            ds = ds.cast_column(column, datasets.Image(decode=False))
        self.ds = ds.select_columns([column])
        self.column = column
        self.label = label or "dataset"

    def __len__(self) -> int:
        return len(self.ds)

    def cells(self, rows: list[int]) -> list[Any]:
        return self.ds[list(rows)][self.column] if rows else []

    def read(self, rows: list[int]):
        """The decoded PIL images of `rows` (0-based), each in its own mode."""
        return [
            decode_cell(c, where=f"{self.label}, row {r + 1}, column {self.column!r}", mode=self.mode)
            for r, c in zip(rows, self.cells(rows), strict=True)
        ]
