"""Built-in dataset kinds, registered through the same `register_datasets` hook a third-party plugin implements.

A plugin package adds a kind the same way: implement ``register_datasets(register)`` with
``@vlkit.hookspecs.hookimpl`` and call ``register("mykind", loader, summary="...")``, where
``loader(source: str | None = None, *, split: str | None = None, **options) -> datasets.Dataset``; then
``load_data("mykind:SOURCE")`` finds it. A kind declares its options (all but `source` and `split`) as one
dataclass with field help, ``register(..., options_cls=MyOptions)``, as every built-in kind does: recipe
checking and ``vlkit plugins --json`` read it (`vlkit.options.option_specs`), and the loader refuses any other
option (`vlkit.options.option_names(MyOptions)`).
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from .coop import CoopOptions, load_coop
from .loaders import (
    HfOptions,
    ImagefolderOptions,
    ManifestOptions,
    ParquetOptions,
    load_hf,
    load_imagefolder,
    load_manifest_kind,
    load_parquet,
)
from .vl_formats import VlFileOptions, Vqav2Options, load_coco_captions, load_gqa, load_nlvr2, load_vqav2
from .webdataset import WebdatasetOptions, load_webdataset
from .winoground import WinogroundOptions, load_winoground


@hookimpl
def register_datasets(register):
    register(
        "hf",
        load_hf,
        summary="Hugging Face hub id hf:user/name, or a local save_to_disk/data directory hf:DIR "
        "(options config, split, revision, streaming)",
        options_cls=HfOptions,
    )
    register(
        "imagefolder",
        load_imagefolder,
        summary="local folder in imagefolder layout (class subfolders or metadata.jsonl/.csv)",
        options_cls=ImagefolderOptions,
    )
    register(
        "manifest",
        load_manifest_kind,
        summary="local JSONL/CSV manifest of image paths with captions, labels, questions/answers or boxes",
        options_cls=ManifestOptions,
    )
    register(
        "coop",
        load_coop,
        summary="CoOp's few-shot layout: a dataset folder with split_zhou_<Name>.json and its images "
        "(options split, shots, seed, image_dir)",
        options_cls=CoopOptions,
    )
    register(
        "parquet", load_parquet, summary="local parquet file or folder of parquet files", options_cls=ParquetOptions
    )
    register(
        "webdataset",
        load_webdataset,
        summary="tar shards (img2dataset/open_clip layout), indexed for random access: "
        "webdataset:/data/train-{0000..0099}.tar or shards=PATTERN",
        options_cls=WebdatasetOptions,
    )
    register(
        "winoground",
        load_winoground,
        summary="Winoground: hub (gated, HF token), synth (the world kind's minimal pairs) or a local copy DIR",
        options_cls=WinogroundOptions,
    )
    register(
        "coco-captions",
        load_coco_captions,
        summary="COCO captions JSON (captions_*.json: images + annotations), one row per image with all its "
        "captions as references (options image_dir, n)",
        options_cls=VlFileOptions,
    )
    register(
        "vqav2",
        load_vqav2,
        summary="VQAv2 questions JSON with its annotations JSON (ten human answers), COCO images "
        "(options annotations, image_dir, n)",
        options_cls=Vqav2Options,
    )
    register(
        "gqa-questions",
        load_gqa,
        summary="GQA questions JSON ({id: {imageId, question, answer, ...}}) and its images/ (options image_dir, n)",
        options_cls=VlFileOptions,
    )
    register(
        "nlvr2-jsonl",
        load_nlvr2,
        summary="NLVR2 JSON lines (identifier, sentence, label) with left/right images "
        "<id>-img0.png/-img1.png (options image_dir, n)",
        options_cls=VlFileOptions,
    )
