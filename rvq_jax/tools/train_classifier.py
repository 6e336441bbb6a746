"""Trains the Fashion-MNIST classifier of the priors' generation metrics.

  python -m rvq_jax.tools.train_classifier --idx_dir=/usr/share/datasets/fashion-mnist \\
      --output=$RVQ_JAX_WEIGHTS_DIR/fashion_mnist_classifier.npz

Reads the IDX files' train split through the project's own source (`IdxSource`: 28×28
centred on a black 32×32 canvas, gray replicated to RGB, [-1, 1] as the data pipeline
maps it), so the network sees exactly the images the tokenizer and priors are trained
on. Trains `ConvClassifier` on cross-entropy,
printing step, it/s, ETA, loss and accuracy; then measures the accuracy on the whole
t10k split, prints it, and writes:

  <output>.npz   the weights, metadata (architecture, input, training, test accuracy) and
                 the t10k feature statistics, the real side of the classifier FD (see
                 `rvq_jax.models.pretrained.classifier`);
  <output>.json  the same report as JSON (test accuracy, per-class accuracy, wall time).

Training: AdamW (weight decay 1e-4), the learning rate warmed up to 2e-3 and
cosine-decayed to 0, batch 64, 2 epochs by default (`--steps`).

Augmentation is off by default: 2 epochs are too few for the network to overfit.
`--max_shift=N` turns on translations by up
to N ≤ 2 pixels (the canvas's black border, so no garment pixel leaves the image).
Horizontal flips (`--flip`) are label-preserving for Fashion-MNIST, but stay off: every
shoe in the data set points left, so a flip-invariant metric network would not notice
samples that point the wrong way.

See README.md for the measured run (test accuracy and wall time).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from flax import nnx

from rvq_jax import files
from rvq_jax.data import preprocess
from rvq_jax.data import sources
from rvq_jax.metrics import classifier_metrics
from rvq_jax.models import pretrained
from rvq_jax.models.pretrained import classifier as classifier_lib
from rvq_jax.train import reporting


@dataclasses.dataclass(frozen=True)
class Settings:
  """How the classifier is trained (the command's flags)."""

  steps: int = 1875            # 2 epochs of the 60,000 training images at batch 64
  batch_size: int = 64
  learning_rate: float = 2e-3  # the peak; cosine decay to 0
  warmup_steps: int = 50
  weight_decay: float = 1e-4   # AdamW's, on every weight
  max_shift: int = 0
  flip: bool = False
  seed: int = 0
  eval_batch_size: int = 500
  log_every: int = 100
  image_size: int = classifier_lib.IMAGE_SIZE
  channels: tuple[int, ...] = classifier_lib.CHANNELS
  feature_dim: int = classifier_lib.FEATURE_DIM


def load_split(idx_dir: str, split: str, image_size: int
               ) -> tuple[np.ndarray, np.ndarray, int]:
  """A whole IDX split as the data pipeline serves it.

  Returns:
    (images uint8 [N, S, S, 3], labels int32 [N], the original image side).
  """
  source = sources.IdxSource(idx_dir, split=split, pad_to=image_size)
  examples = [source[index] for index in range(len(source))]
  images = np.stack([example["image"] for example in examples])
  labels = np.asarray([example["label"] for example in examples], np.int32)
  return images, labels, int(source.images.shape[1])


def _to_float(images: jax.Array) -> jax.Array:
  # The data pipeline's own uint8 → [-1, 1] map, applied on the device (it is duck-typed).
  return preprocess.normalize_image(images)


def augment(key: jax.Array, images: jax.Array, *, max_shift: int, flip: bool) -> jax.Array:
  """Random translations (and optionally horizontal flips) of a batch.

  A translation is a roll: exact as long as |shift| ≤ the black border, which
  `train_classifier` checks.

  Args:
    key: PRNG key.
    images: [B, S, S, C].
    max_shift: largest shift in pixels, each axis independently, uniform in
      [-max_shift, max_shift].
    flip: mirror half of the images left-right.

  Returns:
    [B, S, S, C], same dtype.
  """
  shift_key, flip_key = jax.random.split(key)
  if max_shift:
    shifts = jax.random.randint(shift_key, (images.shape[0], 2), -max_shift, max_shift + 1)
    images = jax.vmap(lambda image, shift: jnp.roll(image, shift, axis=(0, 1)))(
        images, shifts)
  if flip:
    mirror = jax.random.bernoulli(flip_key, 0.5, (images.shape[0], 1, 1, 1))
    images = jnp.where(mirror, images[:, :, ::-1], images)
  return images


def _optimizer(settings: Settings) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, settings.learning_rate, min(settings.warmup_steps, settings.steps // 2),
      max(settings.steps, 1))
  return optax.adamw(schedule, weight_decay=settings.weight_decay)


def evaluate(model: classifier_lib.ConvClassifier, images: np.ndarray, labels: np.ndarray,
             batch_size: int) -> dict[str, np.ndarray]:
  """Totals of `classifier_batch_sums` over a whole split (float64), plus per-class counts.

  Args:
    images: uint8 [N, S, S, 3]; labels: int32 [N].

  Returns:
    The totals, and 'per_class_correct' / 'per_class_count' [num_classes].
  """
  graphdef, state = nnx.split(model)
  num_classes = model.num_classes

  @jax.jit
  def batch_sums(state, images, labels, valid):
    network = nnx.merge(graphdef, state)
    # Real images are on the 8-bit grid already: no quantization needed.
    sums = classifier_metrics.classifier_batch_sums(network, _to_float(images), labels, valid,
                                                    quantize=False)
    predicted = jnp.argmax(network(_to_float(images))["logits"], axis=-1)
    one_hot = jax.nn.one_hot(labels, num_classes) * valid[:, None]
    sums["per_class_correct"] = jnp.sum(one_hot * (predicted == labels)[:, None], axis=0)
    sums["per_class_count"] = jnp.sum(one_hot, axis=0)
    return sums

  totals: dict[str, np.ndarray] = {}
  for start in range(0, len(images), batch_size):
    chunk, chunk_labels = images[start:start + batch_size], labels[start:start + batch_size]
    valid = np.ones(len(chunk), bool)
    pad = batch_size - len(chunk)
    if pad:  # One compiled shape: the last batch is padded with rows that count nothing.
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
      chunk_labels = np.concatenate([chunk_labels, np.zeros(pad, chunk_labels.dtype)])
      valid = np.concatenate([valid, np.zeros(pad, bool)])
    sums = jax.device_get(batch_sums(state, chunk, chunk_labels, valid))
    for name, value in sums.items():
      totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)
  return totals


def train_classifier(idx_dir: str, output: str, settings: Settings = Settings(), *,
                     log: Callable[..., None] | None = None) -> dict[str, Any]:
  """Trains the classifier on `idx_dir`'s train split, tests it on t10k, writes the files.

  Args:
    idx_dir: folder with the four IDX files (`train-*`, `t10k-*`, `.gz` or plain).
    output: the weight file, ending in `.npz`; the report goes next to it (`.json`).
    settings: the training settings.
    log: printf-style progress function (default: the project's progress logger).

  Returns:
    The report (also in `<output>.json` and the file's metadata): 'test_accuracy',
    'test_examples', 'per_class_accuracy', 'train_examples', 'steps', 'epochs',
    'wall_time_s', 'final_train_loss', 'settings', 'output'.
  """
  if not output.endswith(".npz"):
    raise ValueError(f"--output must end in .npz, got {output!r}.")
  log = log or reporting.progress_logger().info
  start_time = time.time()
  train_images, train_labels, source_size = load_split(idx_dir, "train", settings.image_size)
  test_images, test_labels, _ = load_split(idx_dir, "eval", settings.image_size)
  border = (settings.image_size - source_size) // 2
  if settings.max_shift > border:
    raise ValueError(f"max_shift={settings.max_shift} would roll garment pixels across the "
                     f"image edge: the {source_size}² images have a {border}-pixel border "
                     f"on the {settings.image_size}² canvas.")
  class_names = sources.FASHION_MNIST_CLASSES
  log("classifier: %d training and %d test images (%d² centred on %d²) from %s",
      len(train_images), len(test_images), source_size, settings.image_size, idx_dir)

  model = classifier_lib.ConvClassifier(
      image_size=settings.image_size, channels=settings.channels,
      feature_dim=settings.feature_dim, num_classes=len(class_names),
      rngs=nnx.Rngs(settings.seed))
  log("classifier: %d weights; %d steps at batch %d (%.2f epochs)",
      classifier_lib.num_weights(model), settings.steps, settings.batch_size,
      settings.steps * settings.batch_size / len(train_images))
  # The weights are PretrainedWeights, which optimizers elsewhere never select: here they
  # are trained on purpose, as the plain arrays of the split state. The batch norms'
  # running statistics are carried beside them, updated by the forward pass, not by Adam.
  graphdef, weights, stats = nnx.split(model, pretrained.PretrainedWeight, nnx.BatchStat)
  params, stats = nnx.to_pure_dict(weights), nnx.to_pure_dict(stats)
  optimizer = _optimizer(settings)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, stats, opt_state, images, labels, key):
    images = augment(key, _to_float(images), max_shift=settings.max_shift,
                     flip=settings.flip)

    def loss_fn(params):
      network = nnx.merge(graphdef, params, stats)
      logits = network(images, training=True)["logits"]
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      new_stats = nnx.to_pure_dict(nnx.state(network, nnx.BatchStat))
      return loss, (jnp.mean(jnp.argmax(logits, axis=-1) == labels), new_stats)

    (loss, (accuracy, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss, accuracy

  rng = np.random.default_rng(settings.seed)
  key = jax.random.key(settings.seed)
  order, position = rng.permutation(len(train_images)), 0
  window_loss, window_accuracy, window_steps = 0.0, 0.0, 0
  last_time, last_step, loss = time.time(), 0, float("nan")
  for step in range(1, settings.steps + 1):
    if position + settings.batch_size > len(order):  # A new epoch, freshly shuffled.
      order, position = rng.permutation(len(train_images)), 0
    rows = order[position:position + settings.batch_size]
    position += settings.batch_size
    key, step_key = jax.random.split(key)
    params, stats, opt_state, loss, accuracy = train_step(
        params, stats, opt_state, train_images[rows], train_labels[rows], step_key)
    window_loss += float(loss)
    window_accuracy += float(accuracy)
    window_steps += 1
    if step == 1:  # Rates and ETAs leave out the first step's compilation.
      last_time, last_step = time.time(), 1
    if step % settings.log_every == 0 or step == settings.steps:
      now = time.time()
      rate = (step - last_step) / max(now - last_time, 1e-9)
      eta = time.strftime("%H:%M:%S", time.gmtime((settings.steps - step) / rate))
      log("step %d/%d | %.2f it/s | ETA %s | loss=%.4f accuracy=%.4f", step, settings.steps,
          rate, eta, window_loss / window_steps, window_accuracy / window_steps)
      last_time, last_step = now, step
      window_loss, window_accuracy, window_steps = 0.0, 0.0, 0
  train_seconds = time.time() - start_time

  model = nnx.merge(graphdef, params, stats)
  totals = evaluate(model, test_images, test_labels, settings.eval_batch_size)
  test_accuracy = float(totals["classifier_correct"] / totals["classifier_count"])
  per_class = {name: float(correct / count) if count else None for name, correct, count in
               zip(class_names, totals["per_class_correct"], totals["per_class_count"])}
  mu, sigma = classifier_metrics.feature_statistics(totals)
  wall_time = time.time() - start_time
  report = {
      "test_accuracy": test_accuracy,
      "test_examples": int(totals["classifier_count"]),
      "per_class_accuracy": per_class,
      "train_examples": len(train_images),
      "steps": settings.steps,
      "epochs": settings.steps * settings.batch_size / len(train_images),
      "final_train_loss": float(loss),
      "train_time_s": round(train_seconds, 1),
      "wall_time_s": round(wall_time, 1),
      "settings": dataclasses.asdict(settings),
      "output": files.absolute(output),
  }
  metadata = {
      "input": {"dataset": f"the IDX files in {files.absolute(idx_dir)}",
                "source_size": source_size, "image_size": settings.image_size,
                "pad_to": settings.image_size, "channels": 3,
                "color": "gray replicated to RGB", "value_range": [-1, 1]},
      "class_names": list(class_names),
      "test_accuracy": test_accuracy,
      "test_examples": report["test_examples"],
      "reference": {"split": "t10k", "count": report["test_examples"]},
      "training": {key: report[key] for key in ("train_examples", "steps", "epochs",
                                                  "final_train_loss", "wall_time_s",
                                                  "settings")},
  }
  classifier_lib.save_classifier(model, output, metadata,
                                 reference=(mu, sigma, totals["classifier_count"]))
  report_path = output[:-len(".npz")] + ".json"
  files.write_json(report_path, report)
  log("test accuracy %.4f (%.2f%%) on the %d t10k images; wall time %.0f s; wrote %s and %s",
      test_accuracy, 100 * test_accuracy, report["test_examples"], wall_time, output,
      report_path)
  return report


def _define_flags() -> dict:
  """The command's flags, defined only when it runs as a program: importing this module
  (tests, other tools) must not claim names like --steps in absl's global registry."""
  return {
      "idx_dir": flags.DEFINE_string(
          "idx_dir", sources.FASHION_MNIST_DIR,
          "Folder of the train-*/t10k-* IDX files (.gz or plain)."),
      "output": flags.DEFINE_string(
          "output", None, "The weight file to write (.npz); the report goes next to it "
          "(.json).", required=True),
      "steps": flags.DEFINE_integer("steps", Settings.steps, "Training steps."),
      "batch_size": flags.DEFINE_integer("batch_size", Settings.batch_size,
                                         "Training batch size."),
      "learning_rate": flags.DEFINE_float("learning_rate", Settings.learning_rate,
                                          "Peak learning rate (cosine decay to 0)."),
      "max_shift": flags.DEFINE_integer("max_shift", Settings.max_shift,
                                        "Random translations up to this many pixels (0 = off)."),
      "flip": flags.DEFINE_bool("flip", Settings.flip, "Random horizontal flips."),
      "seed": flags.DEFINE_integer("seed", Settings.seed,
                                   "Initialization, order and augmentation."),
      "log_every": flags.DEFINE_integer("log_every", Settings.log_every,
                                        "Steps between lines."),
  }


def main(argv, defined: dict) -> int:
  del argv
  value = {name: flag.value for name, flag in defined.items()}
  settings = Settings(steps=value["steps"], batch_size=value["batch_size"],
                      learning_rate=value["learning_rate"], max_shift=value["max_shift"],
                      flip=value["flip"], seed=value["seed"], log_every=value["log_every"])
  report = train_classifier(value["idx_dir"], value["output"], settings)
  print(json.dumps({key: report[key] for key in ("test_accuracy", "test_examples",
                                                 "wall_time_s", "output")}))
  return 0


if __name__ == "__main__":
  _FLAGS = _define_flags()
  sys.exit(app.run(lambda argv: main(argv, _FLAGS)))
