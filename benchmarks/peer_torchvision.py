r"""torchvision's RetinaNet and Faster R-CNN (R50-FPN) timed like our benchmarks.

  make bench-peer     # installs torch + torchvision into .venv, then runs this
  python benchmarks/peer_torchvision.py --size 512x512 --batch 1 --device cpu \
      --ours configs/mimicdet_r50_fpn_1x.py
  python benchmarks/peer_torchvision.py --size 800x1333 --batch 2 \
      --device cuda --ours configs/mimicdet_r50_fpn_1x.py   # GPU, AMP

torch and torchvision are optional dependencies used only here; nothing is
downloaded (random initialisation, weights=None, weights_backbone=None).
For each peer model it reports training images/s (SGD momentum step after
`--warmup` steps, `--steps` timed as one window, synchronised; autocast AMP
with a GradScaler on cuda) and inference latency (eval mode,
inference_mode, post-processing included, median of `--reps` calls) at the
same image size and batch on the same device. With `--ours CONFIG` it then
runs benchmarks/train_step.py and benchmarks/inference.py (head s) in
subprocesses, with `--ours_python` (default: .venv/bin/python when present,
so torch can live in another environment), and prints the ratios from this
one invocation: training images/s ours / theirs (> 1: we are faster) and
latency ours / theirs (< 1: we are faster).

Setup (`--setup`):
  * `pretrained_like` (default): what users of a torchvision detector train,
    and what our recipes do: frozen BatchNorm, stem + layer1 frozen
    (trainable_backbone_layers=3), torchvision's own model classes and FPN
    (resnet_fpn_backbone; RetinaNet with P3..P7 from C3..C5, Faster R-CNN
    with P2..P6). Random weights with identity frozen BatchNorm make
    activations grow through 16 residual blocks (inf under fp16), so each
    bottleneck's last BatchNorm scale is zeroed (torchvision's
    zero_init_residual); this changes values, not the work done.
  * `builder`: exactly retinanet_resnet50_fpn / fasterrcnn_resnet50_fpn with
    weights=None, weights_backbone=None: trainable BatchNorm and every layer
    trained, as torchvision builds them without a pretrained backbone (more
    work per step than our recipe does).

Image size: torchvision's transform resizes to min_size/max_size and pads to
32; here min_size = min(H, W) and max_size = max(H, W), so the HxW images
are not resized. Our side runs on the canvas `--ours_size` (default: HxW
rounded up to multiples of 128, what our pipeline pads 800x1333 images to:
896x1408), so the comparison is per image of the same size.

CPU: torch runs with OMP_WAIT_POLICY=PASSIVE unless the variable is set;
with spinning OpenMP threads its steps were ~10x slower on a shared 2-core
machine. `--threads` sets torch's thread count.

Score threshold: library defaults (0.05 for both peers) unless
`--score_thresh`. With random weights almost nothing passes 0.05 for them,
while every pair passes our 0.005 (worst-case NMS for us); pass
`--score_thresh 0` for their worst case, or
`--ours_args=--config.eval.score_threshold=0.05` for a lighter one of ours.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = ('retinanet', 'fasterrcnn')


def parse_size(size: str) -> tuple[int, int]:
  h, w = (int(v) for v in size.lower().split('x'))
  return h, w


def build_peer(name: str, size: tuple[int, int], setup: str,
               score_thresh=None):
  """torchvision detector `name` with random weights, no resizing at `size`."""
  # pylint: disable=g-import-not-at-top
  import torch
  import torchvision
  from torchvision.models.detection import backbone_utils
  from torchvision.ops import misc as misc_ops
  from torchvision.ops.feature_pyramid_network import LastLevelP6P7
  # pylint: enable=g-import-not-at-top
  kwargs = dict(min_size=min(size), max_size=max(size))
  if score_thresh is not None:
    kwargs['score_thresh' if name == 'retinanet' else 'box_score_thresh'] = (
        score_thresh)
  det = torchvision.models.detection
  if setup == 'builder':
    builder = (det.retinanet_resnet50_fpn if name == 'retinanet' else
               det.fasterrcnn_resnet50_fpn)
    return builder(weights=None, weights_backbone=None, **kwargs)
  if setup != 'pretrained_like':
    raise ValueError(f'--setup {setup!r}')
  if name == 'retinanet':
    backbone = backbone_utils.resnet_fpn_backbone(
        backbone_name='resnet50', weights=None,
        norm_layer=misc_ops.FrozenBatchNorm2d, trainable_layers=3,
        returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
  else:
    backbone = backbone_utils.resnet_fpn_backbone(
        backbone_name='resnet50', weights=None,
        norm_layer=misc_ops.FrozenBatchNorm2d, trainable_layers=3)
  with torch.no_grad():
    for m in backbone.body.modules():
      if isinstance(m, torchvision.models.resnet.Bottleneck):
        m.bn3.weight.zero_()
  cls = det.RetinaNet if name == 'retinanet' else det.FasterRCNN
  return cls(backbone, num_classes=91, **kwargs)


def synthetic_inputs(batch: int, size: tuple[int, int], device,
                     boxes_per_image: int = 5, seed: int = 0):
  """Random images in [0, 1] (torchvision normalises inside) and gt boxes."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  h, w = size
  images, targets = [], []
  for _ in range(batch):
    images.append(torch.rand(3, h, w, generator=g).to(device))
    side = torch.exp(torch.empty(boxes_per_image, 2).uniform_(
        math.log(16), math.log(min(h, w) / 2), generator=g))
    x1 = torch.rand(boxes_per_image, generator=g) * (w - side[:, 0])
    y1 = torch.rand(boxes_per_image, generator=g) * (h - side[:, 1])
    boxes = torch.stack([x1, y1, x1 + side[:, 0], y1 + side[:, 1]], 1)
    labels = torch.randint(1, 91, (boxes_per_image,), generator=g)
    targets.append(dict(boxes=boxes.to(device), labels=labels.to(device)))
  return images, targets


def _sync(device):
  import torch  # pylint: disable=g-import-not-at-top
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def time_training(model, images, targets, device, *, steps, warmup, amp,
                  amp_dtype) -> dict:
  """SGD-momentum steps (lr as torchvision's reference, 0.02 per 16 images)."""
  import torch  # pylint: disable=g-import-not-at-top
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(params, lr=0.02 * len(images) / 16, momentum=0.9,
                        weight_decay=1e-4)
  use_scaler = amp and amp_dtype == torch.float16
  scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

  def step():
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
      losses = model(images, targets)
      loss = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss

  t0 = time.perf_counter()
  loss = step()
  _sync(device)
  first = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    loss = step()
  _sync(device)
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = step()
  _sync(device)
  window = time.perf_counter() - t0
  step_s = window / max(steps, 1)
  return dict(first_step_s=first, step_s=step_s,
              images_per_s=len(images) / step_s, steps=steps, warmup=warmup,
              last_loss=float(loss.detach().float().cpu()))


def time_inference(model, images, device, *, reps, warmup, amp,
                   amp_dtype) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  model.eval()

  def call():
    with torch.inference_mode(), torch.autocast(
        device.type, dtype=amp_dtype, enabled=amp):
      out = model(images)
    _sync(device)
    return out

  t0 = time.perf_counter()
  call()
  first = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    call()
  times, out = [], None
  for _ in range(reps):
    t0 = time.perf_counter()
    out = call()
    times.append(time.perf_counter() - t0)
  median = float(np.median(times))
  return dict(first_call_s=first, median_s=median, min_s=float(np.min(times)),
              reps=reps, images_per_s=len(images) / median,
              detections_per_image=float(np.mean(
                  [len(o['boxes']) for o in out])))


def run_ours(args, tmp: str) -> dict:
  """benchmarks/train_step.py and inference.py in subprocesses (JSON back)."""
  python = args.ours_python
  size = args.ours_size or 'x'.join(
      str(128 * math.ceil(s / 128)) for s in parse_size(args.size))
  env = dict(os.environ)
  if args.device == 'cpu':
    env['JAX_PLATFORMS'] = 'cpu'
  env.pop('XLA_FLAGS', None)  # one device, as torch uses here
  dtype = args.ours_dtype or ('bf16' if args.device == 'cuda' and args.amp
                              else 'f32')
  common = ['--config', args.ours, '--size', size, '--dtype', dtype]
  common += args.ours_args.split() if args.ours_args else []
  out = dict(size=size, dtype=dtype)
  if 'train' in args.what:
    path = os.path.join(tmp, 'ours_train.json')
    cmd = [python, os.path.join(REPO, 'benchmarks', 'train_step.py'), *common,
           '--batch', str(args.batch), '--steps', str(args.steps),
           '--warmup', str(args.warmup), '--json', path]
    print('+', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    with open(path) as f:
      out['train'] = json.load(f)
  if 'infer' in args.what:
    path = os.path.join(tmp, 'ours_infer.json')
    cmd = [python, os.path.join(REPO, 'benchmarks', 'inference.py'), *common,
           '--batch', ','.join(str(b) for b in args.infer_batch),
           '--head', 's', '--reps', str(args.reps),
           '--warmup', str(args.warmup), '--json', path]
    print('+', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    with open(path) as f:
      out['infer'] = json.load(f)
  return out


def ratios(result: dict) -> list[dict]:
  """ours / theirs per peer: training images/s, inference latency per batch."""
  ours = result.get('ours')
  if not ours:
    return []
  rows = []
  for name, peer in result['peers'].items():
    if 'train' in peer and 'train' in ours:
      rows.append(dict(peer=name,
                       what=f"train images/s, batch {result['args']['batch']}",
                       ours=ours['train']['images_per_s'],
                       theirs=peer['train']['images_per_s'],
                       ratio=ours['train']['images_per_s'] /
                       peer['train']['images_per_s']))
    for b, row in peer.get('infer', {}).items():
      mine = [r for r in ours.get('infer', {}).get('rows', [])
              if r['batch'] == int(b)]
      if mine:
        rows.append(dict(peer=name, what=f'inference latency s, batch {b}',
                         ours=mine[0]['median_s'], theirs=row['median_s'],
                         ratio=mine[0]['median_s'] / row['median_s']))
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--size', default='512x512', help='HxW image size.')
  p.add_argument('--batch', type=int, default=1, help='Training batch.')
  p.add_argument('--infer_batch', default='1',
                 help='Comma-separated inference batches, e.g. 1,8.')
  p.add_argument('--device', default=None, choices=('cpu', 'cuda'),
                 help='Default: cuda when available.')
  p.add_argument('--peers', default=','.join(PEERS))
  p.add_argument('--what', default='train,infer')
  p.add_argument('--setup', default='pretrained_like',
                 choices=('pretrained_like', 'builder'))
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--amp', default=None, action=argparse.BooleanOptionalAction,
                 help='autocast (default: on for cuda, off for cpu).')
  p.add_argument('--amp_dtype', default='fp16', choices=('fp16', 'bf16'),
                 help="fp16 + GradScaler is torchvision's reference recipe.")
  p.add_argument('--score_thresh', type=float, default=None)
  p.add_argument('--threads', type=int, default=0,
                 help='torch CPU threads (0: torch default).')
  p.add_argument('--ours', default=None,
                 help='Also run our benchmarks with this config file.')
  p.add_argument('--ours_python', default=None)
  p.add_argument('--ours_size', default=None)
  p.add_argument('--ours_dtype', default=None, choices=('bf16', 'f32'))
  p.add_argument('--ours_args', default='',
                 help='Extra flags for our scripts, e.g. --config.x=y.')
  p.add_argument('--json', default=None)
  args = p.parse_args()
  args.infer_batch = [int(b) for b in args.infer_batch.split(',')]
  args.what = args.what.split(',')
  if args.ours_python is None:
    venv = os.path.join(REPO, '.venv', 'bin', 'python')
    args.ours_python = venv if os.path.exists(venv) else sys.executable

  # On a shared CPU, OpenMP threads that spin-wait for each other while the
  # cores are busy elsewhere made torch's steps ~10x slower here (2 cores,
  # load ~9); passive waiting removes that. Must be set before torch loads.
  os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  if args.device is None:
    args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
  device = torch.device(args.device)
  if args.amp is None:
    args.amp = device.type == 'cuda'
  amp_dtype = torch.float16 if args.amp_dtype == 'fp16' else torch.bfloat16
  if args.threads:
    torch.set_num_threads(args.threads)
  size = parse_size(args.size)
  torch.manual_seed(0)

  result = dict(
      benchmark='peer_torchvision', args=vars(args),
      command=' '.join(sys.argv),
      versions=dict(torch=torch.__version__,
                    torchvision=torchvision.__version__,
                    python=platform.python_version()),
      device=dict(type=device.type,
                  name=(torch.cuda.get_device_name(device)
                        if device.type == 'cuda' else platform.processor()
                        or platform.machine()),
                  torch_threads=torch.get_num_threads(),
                  omp_wait_policy=os.environ.get('OMP_WAIT_POLICY'),
                  host_cpus=os.cpu_count(),
                  load_average_start=list(os.getloadavg())),
      peers={})
  for name in args.peers.split(','):
    model = build_peer(name, size, args.setup, args.score_thresh).to(device)
    peer = {}
    if 'train' in args.what:
      images, targets = synthetic_inputs(args.batch, size, device)
      peer['train'] = time_training(model, images, targets, device,
                                    steps=args.steps, warmup=args.warmup,
                                    amp=args.amp, amp_dtype=amp_dtype)
      print(f"{name:10s} train  batch {args.batch}  {size[0]}x{size[1]}  "
            f"{peer['train']['step_s'] * 1e3:8.0f} ms/step  "
            f"{peer['train']['images_per_s']:7.2f} images/s  (first step "
            f"{peer['train']['first_step_s']:.1f} s)", flush=True)
    if 'infer' in args.what:
      peer['infer'] = {}
      for b in args.infer_batch:
        images, _ = synthetic_inputs(b, size, device, seed=b)
        row = time_inference(model, images, device, reps=args.reps,
                             warmup=args.warmup, amp=args.amp,
                             amp_dtype=amp_dtype)
        peer['infer'][str(b)] = row
        print(f"{name:10s} infer  batch {b}  {size[0]}x{size[1]}  "
              f"{row['median_s'] * 1e3:8.1f} ms  {row['images_per_s']:7.2f} "
              f"images/s  {row['detections_per_image']:.0f} dets/img",
              flush=True)
    result['peers'][name] = peer
    del model
    if device.type == 'cuda':
      torch.cuda.empty_cache()

  if args.ours:
    with tempfile.TemporaryDirectory() as tmp:
      result['ours'] = run_ours(args, tmp)
  result['ratios'] = ratios(result)
  result['device']['load_average_end'] = list(os.getloadavg())
  if result['ratios']:
    print('\n| peer | measure | ours | theirs | ours / theirs |\n|---|---|---|---|---|')
    for r in result['ratios']:
      print(f"| {r['peer']} | {r['what']} | {r['ours']:.3g} | "
            f"{r['theirs']:.3g} | {r['ratio']:.2f} |")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2, sort_keys=True, default=str)
      f.write('\n')


if __name__ == '__main__':
  main()
