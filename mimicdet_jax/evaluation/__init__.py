"""Evaluation: detections from the dense outputs, the COCO loop, predict, drawing.

postprocess (dense outputs -> detections) -> inference (over devices and
hosts) -> coco (pycocotools, no JAX) -> evaluate (the validation loop);
restore reads a WORKDIR; predict runs a checkpoint on a folder of images;
viz draws. See docs/ARCHITECTURE.md.
"""
