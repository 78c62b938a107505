"""The built-in task plugin: classification, retrieval, vqa, grounding, minimal pairs and the generative tasks
(captioning, open-ended vqa-gen, gqa, nlvr2).

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
    from .generative import CaptioningTask, GqaTask, Nlvr2Task, VqaGenTask
    from .grounding import GroundingTask
    from .pairs import PairsTask
    from .retrieval import RetrievalTask
    from .vqa import VqaTask

    register(
        "classification",
        ClassificationTask,
        "zero-shot-initialised class head (text or linear), cross-entropy; accuracy",
    )
    register("retrieval", RetrievalTask, "symmetric contrastive loss; recall@1/5/10 image->text and text->image")
    register("vqa", VqaTask, "answer classification over a closed answer set from image and question; accuracy")
    register("pairs", PairsTask, "Winoground-form minimal pairs: own caption/image over the swapped one; group score")
    register("grounding", GroundingTask, "box from patch tokens attended by the expression, L1 + GIoU; acc@IoU0.5")
    register("captioning", CaptioningTask, "generative: 'caption:' prompt, caption target; COCO CIDEr-D and BLEU-4")
    register("vqa-gen", VqaGenTask, "generative open-ended VQA ('vqa:' prompt); VQAv2 soft accuracy")
    register("gqa", GqaTask, "generative compositional questions ('gqa:' prompt); exact match after normalisation")
    register("nlvr2", Nlvr2Task, "generative: two images and a statement ('nlvr:' prompt), true/false; accuracy")
