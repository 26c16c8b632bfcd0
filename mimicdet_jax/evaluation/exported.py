"""The exported detector (serving/) in the evaluation tools: eval.py --exported.

`evaluate_exported` runs a directory written by serving/export.py on the
validation split through serving/detector.py (host resize, the artifact,
original pixels) and scores it with the checkpoint's own code
(evaluate.write_and_score, pycocotools), so the two numbers are comparable
to the last digit. `load_detector` and `detect` re-raise the loader's
DetectorError as errors.ArtifactError, which the command-line entry points
print as one line (the loader itself may import nothing of mimicdet_jax).
"""
import contextlib
import os
from typing import Any, Optional, Sequence, Union

from mimicdet_jax import errors
from mimicdet_jax.evaluation import coco as coco_eval
from mimicdet_jax.evaluation import evaluate as evaluate_lib
from mimicdet_jax.serving import detector as detector_lib


@contextlib.contextmanager
def user_errors():
  """DetectorError -> errors.ArtifactError (one line, exit status 1)."""
  try:
    yield
  except detector_lib.DetectorError as e:
    raise errors.ArtifactError(str(e)) from None


def load_detector(path: str, **kwargs) -> detector_lib.Detector:
  """`Detector.load`, with its errors as errors.ArtifactError."""
  with user_errors():
    return detector_lib.Detector.load(path, **kwargs)


def detect(detector: detector_lib.Detector,
           images: Sequence[Any]) -> list[dict[str, Any]]:
  """`detector(images)`, with its errors as errors.ArtifactError."""
  with user_errors():
    return detector(images)


def evaluate_exported(config, detector: Union[str, detector_lib.Detector],
                      out_dir: Optional[str] = None) -> dict[str, Any]:
  """Detects on the validation split with an exported detector; scores it.

  Args:
    config: a resolved config; only data.* (the validation set) and
      eval.batch_size are read: the model is the artifact's.
    detector: a Detector or its directory.
    out_dir: where detections.json, metrics.json and history.jsonl go
      (default DIR/eval beside the artifact).
  Returns:
    The metrics dict (docs/EVAL.md), `step` = the artifact's checkpoint step.

  Images go in chunks of eval.batch_size (at most the artifact's max_batch)
  in the source's order, as `pipeline.make_eval_batches` cuts them, so each
  chunk is padded to the same canvas as in `evaluate`. One process only.
  """
  from mimicdet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.data import validation  # pylint: disable=g-import-not-at-top
  if isinstance(detector, str):
    detector = load_detector(detector)
  out_dir = out_dir or os.path.join(detector.path, 'eval')
  source = pipeline.build_source(config.data, 'val')
  validation.check_same_categories(
      detector.categories,
      os.path.join(detector.path, detector_lib.SIGNATURE_FILE),
      source.categories, getattr(source, 'annotation_file', repr(source)))
  batch_size = max(1, min(int(config.eval.batch_size), detector.max_batch))
  results = []
  for start in range(0, len(source), batch_size):
    examples = [source[i] for i in range(start, min(start + batch_size,
                                                    len(source)))]
    for example, dets in zip(examples,
                             detect(detector, [e['image'] for e in examples])):
      results += coco_eval.image_results(example['image_id'], dets['boxes'],
                                         dets['scores'], dets['category_ids'])
  return evaluate_lib.write_and_score(
      config, source, results, out_dir,
      detector.signature.get('checkpoint_step'), len(source))
