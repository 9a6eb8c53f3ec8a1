"""Evaluation: semantic segmentation (paper §4.3, Table 2), part segmentation (§4.4, Table 3) and
text → segment retrieval, on top of metrics checked against independent computations (pycocotools'
COCOeval is the reference for mask mAP)."""

from use_search.eval.metrics import (
    ConfusionMatrix,
    MaskAP,
    SemsegScores,
    average_precision,
    coco_from_dataset,
    mask_map,
    segmentation_scores,
)
from use_search.eval.parts import (
    COCO_STUFF_CLASSES,
    PartsDataset,
    PartsResult,
    default_background_classes,
    evaluate_parts,
    part_detections,
)
from use_search.eval.retrieval import (
    RetrievalDataset,
    RetrievalResult,
    evaluate_retrieval,
    RetrievalOptions,
    index_and_evaluate,
    judge_hits,
)
from use_search.eval.semseg import SemsegDataset, SemsegResult, evaluate_semseg
from use_search.query.voting import predict_labels

__all__ = [
    "COCO_STUFF_CLASSES", "ConfusionMatrix", "MaskAP", "PartsDataset", "PartsResult", "RetrievalDataset",
    "RetrievalResult", "SemsegDataset", "SemsegResult", "SemsegScores", "average_precision",
    "coco_from_dataset", "default_background_classes", "evaluate_parts", "evaluate_retrieval",
    "evaluate_semseg", "RetrievalOptions", "index_and_evaluate", "judge_hits", "mask_map", "part_detections",
    "predict_labels", "segmentation_scores",
]
