"""Semantic segmentation by voting (paper §4.3), with model ensembles (appendix A.2).

Class-agnostic masks (SAM, point grid + NMS) are computed once per image and embedded by every model
of the ensemble; each model turns its segment embeddings into a softmax over the target classes of
(cosine similarity × its logit scale); the models' probabilities are combined per segment with their
weights (by default OVSeg's weighted geometric mean, as A.2 says); every pixel sums the combined
probabilities of the segments that cover it and takes the class with the highest total. Pixels no
segment covers get the fallback (``VotingSettings.fallback``): the nearest labelled pixel's class,
the class of the whole image taken as one more segment, or none (``UNLABELED``: -1 in the label map,
255 in a label PNG). §4.3 says nothing of them: ``eval semseg`` leaves them unlabeled by default
(``eval.semseg.EVAL_FALLBACK``), ``segment`` fills them (``SEGMENT_FALLBACK``).

Modules, lowest first (none imports the factory; ``factory.load_ensemble`` builds the models):
- ``combine``: per-segment class probabilities and their ensemble combination (numpy only, so the
  settings can check ensemble weights with ``ovseg_exponents``);
- ``vote``: the per-pixel vote, the fallbacks, ``Votes``;
- ``ensemble``: the models of an ensemble and their class vectors;
- ``predict``: one image, segmenter and models in hand;
- ``stored``: the vote over an indexed image's stored masks and vectors (``use-search label``);
- ``png``: label maps as PNG.

This package imports nothing on purpose: ``config`` imports ``voting.combine``, which must not pull in
the modules that import ``config``.
"""
