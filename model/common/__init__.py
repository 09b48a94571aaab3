"""What both systems share: data tables and splits (:mod:`~model.common.data`), the one checkpoint
format (:mod:`~model.common.checkpoint`), the one atomic writer (:mod:`~model.common.files`), ImageNet
files (:mod:`~model.common.imagenet`), the one training skeleton (:mod:`~model.common.training`),
lesion-bootstrap statistics (:mod:`~model.common.metrics`), the report writer
(:mod:`~model.common.report`), provenance of outputs and Grad-CAM. It imports neither system."""
