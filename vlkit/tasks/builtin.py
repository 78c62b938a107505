"""The built-in task plugin: classification, retrieval, vqa, grounding and minimal pairs.

A third-party task registers the same way from its own plugin module:

    from vlkit.hookspecs import hookimpl

    @hookimpl
    def register_tasks(register):
        register("my_task", MyTask, "one-line summary")

where `MyTask` subclasses `vlkit.tasks.base.Task`; the trainer builds it as `MyTask(backbone, train_ds, **options)`.
"""
from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def register_tasks(register):
    from .classification import ClassificationTask
    from .grounding import GroundingTask
    from .pairs import PairsTask
    from .retrieval import RetrievalTask
    from .vqa import VqaTask

    register("classification", ClassificationTask,
             "zero-shot-initialised class head (text or linear), cross-entropy; accuracy")
    register("retrieval", RetrievalTask, "symmetric contrastive loss; recall@1/5/10 image->text and text->image")
    register("vqa", VqaTask, "answer classification over a closed answer set from image and question; accuracy")
    register("pairs", PairsTask, "Winoground-form minimal pairs: own caption/image over the swapped one; group score")
    register("grounding", GroundingTask, "box from patch tokens attended by the expression, L1 + GIoU; acc@IoU0.5")
