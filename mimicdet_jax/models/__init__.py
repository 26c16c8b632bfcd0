"""Flax modules of MimicDet (no losses).

backbones.ResNet, fpn.FPN, anchors.dense_anchors, heads.{RefinementModule,
THead, SHead}, mimicdet.MimicDet. Import the submodule you need; this package
imports nothing so that, e.g., loading backbone weights does not pull in the
heads' ops.
"""
