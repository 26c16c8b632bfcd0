r"""Loads and runs an exported MimicDet detector with jax, numpy and Pillow only.

  from mimicdet_jax.serving.detector import Detector
  detector = Detector.load('exported/')        # serving/export.py wrote it
  (result,) = detector(['photo.jpg'])          # paths, bytes, PIL or uint8 arrays
  result['boxes']         # float32 [n, 4] x1y1x2y2, original-image pixels
  result['scores']        # float32 [n], descending
  result['category_ids']  # int32 [n], the annotation file's category ids

The host work is the evaluation pipeline's (data/transforms.py), redone here
exactly: decode to RGB uint8; resize so the shorter side is
`resize.min_size` unless the longer side would pass `resize.max_size` (then
the longer side is max_size), with Pillow's bilinear filter; zero-pad the
batch to the smallest canvas (by area, then listed order) holding all its
images; and map the artifact's canvas-pixel boxes back with the per-axis
factors original / resized, as evaluation/coco.to_original_pixels. This
module imports nothing of mimicdet_jax (tests/test_layout.py): a serving
process needs neither flax, optax, orbax nor the model code. The copies of
those few lines are tested against the originals (tests/test_serving.py).

A batch is padded (with copies of its first image, dropped afterwards) to
the next power of two, at most the signature's `max_batch`, so a server
compiles at most log2(max_batch) + 1 shapes per canvas. More images than
`max_batch` in one call is an error: split them.

Every problem with the directory or the inputs raises `DetectorError` (a
ValueError) with a one-line message naming the file or the input.
"""
import hashlib
import io
import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from PIL import Image

SIGNATURE_FILE = 'signature.json'
FORMAT = 'mimicdet_jax.serving.detector'
# The artifact's calling convention (inputs, outputs, their meaning); bumped
# when it changes, and the loader refuses versions it does not know.
CALLING_CONVENTION_VERSION = 1


class DetectorError(ValueError):
  """An unusable artifact directory or input; the message names it."""


# ------------------------------------------------------------ host rules
def resized_size(h: int, w: int, short_side: int, max_size: int
                 ) -> tuple[int, int]:
  """(new_h, new_w): shorter side -> short_side, longer <= max_size.

  data/transforms.resized_size, the same float64 arithmetic and rounding.
  """
  scale = min(short_side / min(h, w), max_size / max(h, w))
  return (max(1, min(int(round(h * scale)), max_size)),
          max(1, min(int(round(w * scale)), max_size)))


def resize_image(image: np.ndarray, short_side: int, max_size: int
                 ) -> np.ndarray:
  """uint8 [H, W, 3] -> [new_h, new_w, 3], Pillow bilinear (as transforms)."""
  h, w = image.shape[:2]
  new_h, new_w = resized_size(h, w, short_side, max_size)
  if (new_h, new_w) == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((new_w, new_h),
                                                  Image.BILINEAR))


def choose_canvas(image_sizes: Sequence[Sequence[int]],
                  canvases: Sequence[Sequence[int]]) -> tuple[int, int]:
  """Smallest canvas (by area, then listed order) holding every (h, w)."""
  need_h = max(int(s[0]) for s in image_sizes)
  need_w = max(int(s[1]) for s in image_sizes)
  fits = [(int(c[0]), int(c[1])) for c in canvases
          if c[0] >= need_h and c[1] >= need_w]
  if not fits:
    raise DetectorError(
        f'no canvas of the artifact ({", ".join(f"{h}x{w}" for h, w in canvases)})'
        f' holds a resized image of (h, w)=({need_h}, {need_w})')
  return min(fits, key=lambda c: c[0] * c[1])


def to_original_pixels(boxes: np.ndarray, image_size, orig_size) -> np.ndarray:
  """Canvas boxes [..., M, 4] -> original pixels, clipped to the image.

  evaluation/coco.to_original_pixels: x * orig_w / resized_w per axis.
  """
  boxes = np.asarray(boxes, np.float32)
  resized = np.asarray(image_size, np.float32)[..., None, :]
  orig = np.asarray(orig_size, np.float32)[..., None, :]
  factor = orig / np.maximum(resized, 1.0)  # [..., 1, 2] as (h, w)
  out = boxes * np.concatenate([factor[..., ::-1]] * 2, axis=-1)
  out[..., 0::2] = np.clip(out[..., 0::2], 0.0, orig[..., 1:2])
  out[..., 1::2] = np.clip(out[..., 1::2], 0.0, orig[..., 0:1])
  return out


def read_image(image: Any, name: str = 'image') -> np.ndarray:
  """A path, encoded bytes, a PIL image or a uint8 [H, W, 3] array -> RGB
  uint8 [H, W, 3] (grey, palette, CMYK and RGBA converted as data/coco.py
  converts them)."""
  if isinstance(image, (str, os.PathLike, bytes, bytearray)):
    what = 'bytes' if isinstance(image, (bytes, bytearray)) else os.fspath(image)
    try:
      source = (io.BytesIO(image) if isinstance(image, (bytes, bytearray))
                else image)
      with Image.open(source) as img:
        return np.asarray(img.convert('RGB'), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      where = what if what != 'bytes' else name
      raise DetectorError(f'{where}: not a readable image ({type(e).__name__}: '
                          f'{e})') from None
  if isinstance(image, Image.Image):
    return np.asarray(image.convert('RGB'), dtype=np.uint8)
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise DetectorError(f'{name}: dtype {image.dtype}; expected uint8 RGB '
                          'pixels [H, W, 3]')
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
      raise DetectorError(f'{name}: shape {image.shape}; expected uint8 RGB '
                          'pixels [H, W, 3]')
    return image
  raise DetectorError(f'{name}: a {type(image).__name__}; expected a file '
                      'path, bytes, a PIL image or a uint8 [H, W, 3] array')


# ------------------------------------------------------------ the artifact
def _sha256(blob: bytes) -> str:
  return hashlib.sha256(blob).hexdigest()


def read_signature(path: str) -> dict[str, Any]:
  """DIR/signature.json, checked for the keys and version this loader reads."""
  sig_path = os.path.join(path, SIGNATURE_FILE)
  if not os.path.isdir(path):
    raise DetectorError(f'{path}: not a directory (expected an exported '
                        f'detector: {SIGNATURE_FILE} and *.jaxexport)')
  try:
    with open(sig_path) as f:
      sig = json.load(f)
  except FileNotFoundError:
    raise DetectorError(f'{sig_path}: not found (not an exported detector '
                        'directory?)') from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DetectorError(f'{sig_path}: cannot read it as JSON: {e}') from None
  if not isinstance(sig, dict) or sig.get('format') != FORMAT:
    raise DetectorError(f'{sig_path}: not a {FORMAT} signature')
  version = sig.get('calling_convention_version')
  if version != CALLING_CONVENTION_VERSION:
    raise DetectorError(
        f'{sig_path}: calling_convention_version {version!r}; this loader '
        f'reads version {CALLING_CONVENTION_VERSION} (export again, or use the '
        'mimicdet_jax that wrote it)')
  needed = ('artifacts', 'categories', 'max_batch', 'max_detections',
            'resize', 'platforms')
  missing = [k for k in needed if k not in sig]
  if missing:
    raise DetectorError(f'{sig_path}: missing {", ".join(missing)}')
  return sig


def _runs_here(platforms: Sequence[str]) -> bool:
  """Whether an artifact lowered for `platforms` (jax.export names: cpu,
  cuda, rocm, tpu) runs on this process's default JAX backend."""
  backend = jax.default_backend()
  names = ('cuda', 'rocm') if backend == 'gpu' else (backend,)
  return any(p in platforms for p in names)


def _load_artifact(path: str, entry: Mapping[str, Any],
                   max_detections: int) -> jax.export.Exported:
  """One DIR/detector_{H}x{W}.jaxexport, checked against its signature entry."""
  file = os.path.join(path, str(entry.get('file', '')))
  try:
    with open(file, 'rb') as f:
      blob = f.read()
  except OSError as e:
    raise DetectorError(f'{file}: cannot read the artifact ({e.strerror or e})'
                        ) from None
  if _sha256(blob) != entry.get('sha256'):
    raise DetectorError(
        f'{file}: its sha256 is not the one {SIGNATURE_FILE} records '
        f'({len(blob)} bytes; corrupted, truncated or from another export)')
  try:
    exported = jax.export.deserialize(bytearray(blob))
  except Exception as e:  # pylint: disable=broad-except
    # flatbuffers / jax raise anything from IndexError to struct.error.
    raise DetectorError(f'{file}: not a jax.export artifact this JAX can read '
                        f'({type(e).__name__}: {e})'.replace('\n', ' ')) from None
  h, w = (int(v) for v in entry['canvas'])
  got_in = [(tuple(str(d) for d in a.shape), str(a.dtype))
            for a in exported.in_avals]
  want_in = [(('b', str(h), str(w), '3'), 'uint8'), (('b', '2'), 'int32')]
  got_out = sorted((tuple(str(d) for d in a.shape), str(a.dtype))
                   for a in exported.out_avals)
  d = str(max_detections)
  want_out = sorted([(('b', d, '4'), 'float32'), (('b', d), 'float32'),
                     (('b', d), 'int32'), (('b',), 'int32')])
  if got_in != want_in or got_out != want_out:
    raise DetectorError(
        f'{file}: takes {got_in} and returns {got_out}, but {SIGNATURE_FILE} '
        f'describes canvas {h}x{w} with max_detections {d} (mismatched '
        'signature)')
  return exported


class Detector:
  """An exported detector: host pre/post-processing around the artifacts.

  Attributes:
    path: the directory.
    signature: its signature.json.
    canvases: [(h, w)] the artifacts take.
    categories: [{'id', 'name'}], the category ids the outputs use.
    max_batch: the most images one call takes.
  """

  def __init__(self, path: str, signature: dict[str, Any],
               exported: Mapping[tuple[int, int], jax.export.Exported],
               compiler_options: Optional[Mapping[str, Any]] = None):
    self.path = path
    self.signature = signature
    self._exported = dict(exported)
    self.canvases = [tuple(int(v) for v in a['canvas'])
                     for a in signature['artifacts']]
    self.categories = list(signature['categories'])
    self.max_batch = int(signature['max_batch'])
    self._resize = signature['resize']
    self._compiler_options = dict(compiler_options or {})
    self._compiled = {}  # (canvas, padded batch) -> compiled executable

  @classmethod
  def load(cls, path: str,
           compiler_options: Optional[Mapping[str, Any]] = None) -> 'Detector':
    """Reads DIR/signature.json and every artifact it lists, checked.

    compiler_options: XLA options for compiling the artifacts (e.g.
    {'xla_backend_optimization_level': 0} for quick tests).
    """
    sig = read_signature(path)
    if not _runs_here(sig['platforms']):
      raise DetectorError(
          f'{os.path.join(path, SIGNATURE_FILE)}: lowered for '
          f'{", ".join(sig["platforms"])}, not for {jax.default_backend()} '
          "(this process's JAX backend); export again with --platforms")
    if not sig['artifacts']:
      raise DetectorError(f'{os.path.join(path, SIGNATURE_FILE)}: no artifacts')
    exported = {}
    for entry in sig['artifacts']:
      canvas = tuple(int(v) for v in entry['canvas'])
      exported[canvas] = _load_artifact(path, entry, int(sig['max_detections']))
    return cls(path, sig, exported, compiler_options)

  def padded_batch(self, n: int) -> int:
    """The batch size a call of n images runs at: the next power of two,
    at most max_batch."""
    return min(self.max_batch, 1 << max(0, n - 1).bit_length())

  def _executable(self, canvas: tuple[int, int], batch: int):
    key = (canvas, batch)
    if key not in self._compiled:
      h, w = canvas
      lowered = jax.jit(self._exported[canvas].call).lower(
          jax.ShapeDtypeStruct((batch, h, w, 3), np.uint8),
          jax.ShapeDtypeStruct((batch, 2), np.int32))
      self._compiled[key] = lowered.compile(self._compiler_options or None)
    return self._compiled[key]

  def detect_canvas(self, images: np.ndarray, image_sizes: np.ndarray
                    ) -> dict[str, np.ndarray]:
    """The artifact itself, on images already resized and padded.

    Args:
      images: uint8 [n, Hc, Wc, 3], (Hc, Wc) one of `canvases`, 1 <= n <=
        max_batch, zero outside each image.
      image_sizes: int [n, 2] (h, w) of each image inside the canvas.
    Returns:
      boxes float32 [n, D, 4] (canvas pixels), scores float32 [n, D],
      classes int32 [n, D] (category ids, -1 past num_detections),
      num_detections int32 [n]; rows sorted by descending score.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
      dtype = getattr(images, 'dtype', type(images).__name__)
      raise DetectorError(f'images: dtype {dtype}; expected uint8 canvases '
                          '[n, H, W, 3]')
    if images.ndim != 4 or images.shape[3] != 3:
      raise DetectorError(f'images: shape {images.shape}; expected [n, H, W, 3]')
    n = images.shape[0]
    canvas = tuple(images.shape[1:3])
    if canvas not in self._exported:
      raise DetectorError(
          f'images: canvas {canvas[0]}x{canvas[1]} is none of the artifact\'s '
          f'({", ".join(f"{h}x{w}" for h, w in self.canvases)})')
    if not 1 <= n <= self.max_batch:
      raise DetectorError(
          f'images: a batch of {n}; the artifact takes 1 to max_batch='
          f'{self.max_batch} images per call ({SIGNATURE_FILE}); split it')
    sizes = np.asarray(image_sizes)
    if (sizes.shape != (n, 2) or not np.issubdtype(sizes.dtype, np.integer) or
        np.any(sizes < 1) or np.any(sizes > np.asarray(canvas))):
      raise DetectorError(f'image_sizes: {sizes.shape} {sizes.dtype}; expected '
                          f'int [{n}, 2] (h, w) within the canvas {canvas}')
    batch = self.padded_batch(n)
    fill = np.zeros(batch - n, np.int64)
    images = np.concatenate([images, images[fill]])
    sizes = np.concatenate([sizes, sizes[fill]]).astype(np.int32)
    out = self._executable(canvas, batch)(images, sizes)
    return {k: np.asarray(v)[:n] for k, v in out.items()}

  def preprocess(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
    """Decoded, resized and padded as the evaluation pipeline does it.

    Returns images uint8 [n, Hc, Wc, 3], image_sizes int32 [n, 2] (resized
    h, w), orig_sizes int32 [n, 2] (h, w of the inputs).
    """
    if isinstance(images, (str, os.PathLike, bytes, np.ndarray, Image.Image)):
      raise DetectorError('images: expected a list of images, got one '
                          f'{type(images).__name__}')
    if not 1 <= len(images) <= self.max_batch:
      raise DetectorError(
          f'images: {len(images)} images; the artifact takes 1 to '
          f'max_batch={self.max_batch} per call ({SIGNATURE_FILE}); split them')
    decoded = [read_image(im, f'images[{i}]') for i, im in enumerate(images)]
    short, longest = int(self._resize['min_size']), int(self._resize['max_size'])
    resized = [resize_image(im, short, longest) for im in decoded]
    sizes = np.array([r.shape[:2] for r in resized], np.int32)
    hc, wc = choose_canvas(sizes, self.canvases)
    batch = np.zeros((len(resized), hc, wc, 3), np.uint8)
    for i, r in enumerate(resized):
      batch[i, :r.shape[0], :r.shape[1]] = r
    return dict(images=batch, image_sizes=sizes,
                orig_sizes=np.array([d.shape[:2] for d in decoded], np.int32))

  def __call__(self, images: Sequence[Any]) -> list[dict[str, np.ndarray]]:
    """Detections of each image, in original-image pixels.

    Args:
      images: a list of at most max_batch images: file paths, encoded bytes,
        PIL images or uint8 RGB arrays [H, W, 3], any sizes.
    Returns:
      Per image: boxes float32 [n, 4] (x1, y1, x2, y2, original pixels),
      scores float32 [n] (descending), category_ids int32 [n].
    """
    batch = self.preprocess(images)
    dets = self.detect_canvas(batch['images'], batch['image_sizes'])
    boxes = to_original_pixels(dets['boxes'], batch['image_sizes'],
                               batch['orig_sizes'])
    out = []
    for i, count in enumerate(dets['num_detections']):
      out.append(dict(boxes=boxes[i, :count], scores=dets['scores'][i, :count],
                      category_ids=dets['classes'][i, :count]))
    return out
