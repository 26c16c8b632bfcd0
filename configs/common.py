"""Every number of SPEC.md sections 2-5, as one ConfigDict.

Recipe files (mimicdet_r50_fpn_1x.py, ...) call `base_config()`, or one recipe
that does (proxy_real.py and photos.py start from demo.py), and override keys
in plain sight, one short reason each; nothing chains further
(tests/test_config.py checks both). To find the code that
reads a key, grep for it (e.g. `grep -rn "pos_shrink" mimicdet_jax`).
"""
import math

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  c.data.source = 'coco_json'  # coco_json | tfds
  # COCO 2017 where the README puts it; any COCO-format JSON + folder works.
  c.data.train_annotations = 'data/coco/annotations/instances_train2017.json'
  c.data.train_images = 'data/coco/train2017'  # file_name entries are relative to it
  c.data.val_annotations = 'data/coco/annotations/instances_val2017.json'
  c.data.val_images = 'data/coco/val2017'
  c.data.tfds_name = 'coco/2017'
  c.data.tfds_data_dir = ''  # '' = TFDS default (~/tensorflow_datasets)
  c.data.tfds_train_split = 'train'
  c.data.tfds_val_split = 'validation'
  c.data.num_classes = -1  # -1: from the training annotation file's categories
  c.data.train_min_sizes = (800,)  # shorter side; several values = multi-scale
  # Training resize: resize (shorter side from train_min_sizes, the paper) |
  # lsj (large-scale jitter: fit lsj_size x a factor drawn uniformly from
  # lsj_scale, random crop / zero pad to lsj_size x lsj_size: one canvas,
  # canvas_buckets unused in training). Evaluation always resizes.
  c.data.augment = 'resize'
  c.data.lsj_size = 1024  # the training canvas under lsj (detectron2's LSJ)
  c.data.lsj_scale = (0.1, 2.0)  # factor range (detectron2 new_baselines)
  # A box the lsj crop cuts to a side <= this (pixels) is dropped (counted):
  # detectron2's filter_empty_instances threshold.
  c.data.lsj_min_box_side = 1e-5
  c.data.min_size = 800  # shorter side at evaluation
  c.data.max_size = 1333  # longer side bound
  # Fixed canvases (h, w), each divisible by 128 and compiled once; a batch is
  # padded to the smallest canvas that holds all its images.
  c.data.canvas_buckets = ((896, 1408), (1408, 896), (1408, 1408))
  c.data.size_divisor = 128
  c.data.max_boxes = 100
  c.data.hflip_prob = 0.5
  c.data.pixel_mean = (123.675, 116.28, 103.53)  # RGB, torchvision ImageNet
  c.data.pixel_std = (58.395, 57.12, 57.375)
  c.data.bad_input = 'skip'  # skip (and count) | fail
  # Training batches carry uint8 pixels (zero-padded) and the jitted step
  # normalises them (bit-identical inputs; 4x fewer bytes per batch through
  # the loader and to the device). False: float32 normalised on the host.
  c.data.device_normalize = True
  c.data.num_workers = 0  # grain worker processes (0 = in-process)
  c.data.prefetch = 2

  # --------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  c.model.dtype = 'float32'  # compute dtype: float32 | bfloat16 (params stay float32)
  c.model.num_classes = -1  # -1: data.num_classes (resolved at start-up)
  c.model.staggered = True  # False: T-head reads P3..P7 like the S-head
  c.model.backbone_init = ''  # orbax checkpoint from mimicdet_jax.tools.import_weights
  c.model.backbone = ml_collections.ConfigDict()
  c.model.backbone.arch = 'resnet50'  # resnet50 | resnet101 | resnext101_32x8d | resnext101_64x4d | resnet_tiny
  c.model.backbone.frozen_stages = 1  # stem + stage 1 frozen
  c.model.backbone.remat = False  # nn.remat per stage
  c.model.backbone.norm = 'frozen_bn'  # frozen_bn (pretrained affine) | group_norm (from scratch)
  # ResNeXt's grouped 3x3 convs: auto (block-diagonal on TPU, XLA's grouped
  # conv elsewhere) | xla | blockdiag (ops/grouped_conv.py; same weights)
  c.model.backbone.grouped_conv = 'auto'
  c.model.fpn_channels = 256
  c.model.t_levels = (2, 3, 4, 5, 6)  # high-resolution set (staggered pyramid)
  c.model.s_levels = (3, 4, 5, 6, 7)  # low-resolution set; refinement + S-head
  c.model.anchor_scale = 4.0  # anchor side = anchor_scale * stride

  # --------------------------------------------- refinement module + targets
  c.refine = ml_collections.ConfigDict()
  c.refine.channels = 256
  c.refine.pos_shrink = 0.3
  c.refine.num_samples = 256  # sampled positions per image for the BCE
  c.refine.pos_fraction = 0.5
  c.refine.cls_loss = 'bce'  # bce (sampled) | focal (all positions)
  c.refine.focal_alpha = 0.25
  c.refine.focal_gamma = 2.0
  c.refine.stds = (1.0, 1.0, 1.0, 1.0)

  # ------------------------------------------------------------ proposals
  c.proposals = ml_collections.ConfigDict()
  c.proposals.pre_nms_topk = 1000  # per level
  c.proposals.nms_threshold = 0.8
  c.proposals.num_proposals = 2000  # per image, padded, with a validity mask
  # The proposal NMS's block size (ops.nms tile_size): speed only, the kept
  # set is the same for every value (tests/test_ops_nms.py).
  c.proposals.nms_tile_size = 512
  # Top-k (training proposals and inference) over cells inside the image only;
  # False lets canvas-padding cells compete (the behaviour before SPEC's fix).
  c.proposals.inside_image = True

  # --------------------------------------------------------------- T-head
  c.t_head = ml_collections.ConfigDict()
  c.t_head.roi_size = 7
  c.t_head.sampling_ratio = 2
  # Level each T-head box is pooled from: staggered = one level finer than its
  # origin (P_l -> P_(l-1)); fpn = FPN rule floor(4 + log2(sqrt(wh)/224)).
  c.t_head.level_rule = 'staggered'  # staggered | fpn
  c.t_head.canonical_size = 224.0  # FPN level rule k = floor(4 + log2(sqrt(wh)/224))
  c.t_head.canonical_level = 4
  # RoIAlign form: gather (a gather; its gradient a scatter-add; fastest on
  # CPU) | einsum (one-hot bilinear weights as matmuls, no gather/scatter;
  # for TPUs and scatter-bound GPUs). Same values; docs/BENCHMARKS.md.
  c.t_head.roi_align_impl = 'gather'
  # none (the paper) | group_norm: GroupNorm before each hidden ReLU (cls
  # fcs, reg convs, reg fc), as detectron2's GN heads (docs/S_HEAD_GAP.md E12).
  c.t_head.norm = 'none'
  c.t_head.fc_dim = 1024
  c.t_head.num_convs = 4
  c.t_head.conv_dim = 256
  c.t_head.fg_iou = 0.5
  c.t_head.num_samples = 128
  c.t_head.fg_fraction = 0.25
  c.t_head.append_gt = True
  c.t_head.stds = (0.1, 0.1, 0.2, 0.2)

  # --------------------------------------------------------------- S-head
  c.s_head = ml_collections.ConfigDict()
  c.s_head.num_logits = -1  # -1: same as the T-head (num_classes + 1)
  c.s_head.deformable = True  # False: plain conv of the same kernel size
  c.s_head.p3_kernel = 3
  c.s_head.kernel = 5  # P4..P7, shared weights
  c.s_head.channels = 256
  c.s_head.offset_hidden = (64, 128)
  # Offset micro-net input is stop-gradient (as Guided Anchoring's feature
  # adaption): S-head losses do not move the refinement regression through it.
  c.s_head.offset_stop_grad = True
  # Where the deformable taps sample: learned = the offset micro-net (the
  # paper); box = a k x k grid over the refined box (no parameters);
  # box_learned = that grid plus the micro-net as a learned correction.
  c.s_head.offset_mode = 'learned'  # learned | box | box_learned
  # The training loss runs the S-head only at the proposals and mimic samples
  # it reads (the same outputs, ~10x fewer positions; models/mimicdet.py
  # `s_head_sparse`); False: dense, then read. Needs s_head.norm none.
  c.s_head.sparse_train = True
  c.s_head.cls_dim = 1024
  c.s_head.reg_dim = 1024
  c.s_head.fg_iou = 0.5
  c.s_head.ohem_samples = 128  # proposals per image in the S-head loss
  # ohem: the ohem_samples largest losses (the paper); balanced: drawn like
  # the T-head's samples, at most fg_fraction foreground.
  c.s_head.sampling = 'ohem'  # ohem | balanced
  # none (the paper) | group_norm: GroupNorm before the cls / reg hidden ReLUs
  # (docs/S_HEAD_GAP.md E12).
  c.s_head.norm = 'none'
  c.s_head.fg_fraction = 0.25
  c.s_head.stds = (0.1, 0.1, 0.2, 0.2)

  # ---------------------------------------------------------------- mimic
  c.mimic = ml_collections.ConfigDict()
  c.mimic.enabled = True
  c.mimic.paths = 'both'  # cls | reg | both
  # Distance per path, a name in losses/mimic.py DISTANCES (kl compares
  # class distributions: cls path only).
  c.mimic.cls_distance = 'cosine'  # cosine | l2 | smooth_l1 | kl
  c.mimic.reg_distance = 'cosine'  # cosine | l2 | smooth_l1
  c.mimic.temperature = 1.0  # kl
  c.mimic.teacher_grad = 'stopped'  # stopped | flowing
  c.mimic.samples = 'all'  # all | foreground
  # Appended gt boxes have no anchor origin: left out of the mimic by default.
  c.mimic.include_gt = False
  c.mimic.weight = 1.0

  c.loss_weights = ml_collections.ConfigDict()
  c.loss_weights.refine = 1.0
  c.loss_weights.s_head = 1.0
  c.loss_weights.t_head = 1.0

  c.box = ml_collections.ConfigDict()
  c.box.scale_clip = math.log(1000.0 / 16)  # dw/dh clip before exp

  # ---------------------------------------------------------------- optim
  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = 'sgd'  # sgd (the paper) | adamw (the from-scratch CPU demo)
  c.optim.base_lr = 0.02
  c.optim.base_batch_size = 16  # lr scales linearly with train.batch_size / this
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4  # not on norm scales/biases
  c.optim.warmup_steps = 500
  c.optim.warmup_factor = 0.001
  c.optim.decay_steps = (60000, 80000)
  c.optim.decay_factor = 0.1
  c.optim.grad_clip_norm = 0.0  # 0 = off
  c.optim.adam_eps = 1e-8  # adamw's epsilon (optax's default)
  # lr x this for the S-head (params s_head_net) only: its own param group.
  # 1.0 = one lr for the whole model, the paper's recipe (docs/S_HEAD_GAP.md, E8).
  c.optim.s_head_lr_mult = 1.0
  # lr x this for the T-head (params t_head_net) only, likewise.
  c.optim.t_head_lr_mult = 1.0
  # Exponential moving average of the weights, updated after every applied
  # step; 0 = off (the paper has none). Evaluation, predict and export use it
  # when present (eval.weights). docs/TRAINING.md, "EMA of the weights".
  c.optim.ema_decay = 0.0
  # EMA warm-up: decay of update n = min(ema_decay, (1 + n) / (ema_warmup + n)),
  # d2go's DECAY_WARM_UP_FACTOR / TensorFlow's ExponentialMovingAverage (10);
  # 0 = none (the full decay from the first update).
  c.optim.ema_warmup = 10.0

  # ---------------------------------------------------------------- train
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16  # global
  c.train.total_steps = 90000
  c.train.log_every = 20
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3
  c.train.max_consecutive_nonfinite = 10
  c.train.eval_every = 0  # 0 = only at the end (when eval.at_end)
  # With train.eval_every > 0, keep the weights of the best evaluation by this
  # metrics.json key (higher is better) in WORKDIR/checkpoints_best/, which
  # rotation never deletes; '' = off. On by default: it costs nothing without
  # periodic evaluation and one model's weights with it. docs/TRAINING.md.
  c.train.keep_best = 'AP'
  # The loss runs per image (vmap, batch of one) with the step key folded with
  # the image's global index: sampling and normalisation do not depend on how
  # the batch is split over devices/hosts. False: per-device batch, device key.
  c.train.loss_per_image = True
  # Micro-batches per device batch (a lax.scan in the step): the gradients of
  # k slices of batch_size / devices / k images are averaged into one update,
  # so a batch fits in 1/k of the activation memory. 1 = one pass (the paper).
  c.train.grad_accum_steps = 1
  # S-head finishing phase: the last N of train.total_steps train the S-head
  # alone (s_head_net; every other module a constant, no backward through
  # them: a cheaper step) against the teacher as it stands, its lr x
  # s_head_finish_lr_mult. 0 = joint training throughout (the paper).
  # Issue 42; docs/TRAINING.md, "S-head finishing phase".
  c.train.s_head_finish_steps = 0
  c.train.s_head_finish_lr_mult = 1.0
  # How the per-device step spans the devices: pmap (jax.pmap over the local
  # devices) | shard_map (jax.jit(jax.shard_map) over a global 'data' mesh,
  # global input arrays; preferred on TPU pods, see docs/TRAINING.md). Same
  # losses and parameters; checkpoints resume under either.
  c.train.parallelism = 'pmap'
  # JAX's persistent compilation cache, so that a restart of the same config
  # loads the compiled step instead of compiling it again (CPU: ~40 s -> a
  # few s; docs/TRAINING.md). '' = off; a relative path is under the workdir;
  # this default is one cache per user, shared by all runs.
  c.train.compile_cache = '~/.cache/mimicdet_jax/jax_compile_cache'

  # ----------------------------------------------------------------- eval
  c.eval = ml_collections.ConfigDict()
  c.eval.head = 's'  # s | t | both (| s_cls+t_box | t_cls+s_box: diagnostics)
  c.eval.pre_nms_topk = 1000
  c.eval.score_threshold = 0.005
  c.eval.nms_threshold = 0.6
  # hard (greedy, SPEC) | soft: Gaussian soft-NMS (Bodla et al. 2017); soft
  # ignores nms_threshold and drops what decays below score_threshold
  c.eval.nms = 'hard'
  c.eval.soft_nms_sigma = 0.5  # exp(-IoU^2 / sigma); 0.5 as the paper and mmcv
  c.eval.tta = 'none'  # none | hflip: the image and its mirror, merged before NMS
  c.eval.max_detections = 100
  c.eval.score_times_objectness = False
  c.eval.batch_size = 8
  c.eval.viz = 0  # draw the first N validation images
  c.eval.viz_score_threshold = 0.3  # detections drawn in pictures (eval --viz, predict)
  c.eval.at_end = False
  # Which weights of a checkpoint detect: ema (optim.ema_decay's average, when
  # the run kept one; otherwise the raw weights) | raw.
  c.eval.weights = 'ema'
  return c
