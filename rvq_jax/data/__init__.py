"""rvq_jax.data: image sources → deterministic per-host batches → global jax.Arrays.

    from rvq_jax import data

    config = data.get_default_config()        # source='embedded', 256×256
    config.image_size, config.batch_size = 64, 16
    train = data.create_dataset(config, split="train", seed=0)
    batch = next(train)                       # numpy; 'image' (B/P, 64, 64, 3) in [-1, 1]
    batch = data.to_global_array(batch, jax.sharding.NamedSharding(mesh, P("data")))
    state = train.get_state()                 # {'step': 1, ...}: save it with the model
    train.restore(state)                      # the next batch is what an unbroken run sees

Layers: `sources` (random access to raw uint8 images, label maps, class labels),
`preprocess` (resize, crop, flip, [-1, 1], randomness from (seed, epoch, index)),
`iterator` (the grain pipeline: global per-epoch order, per-host slices, threaded
decoding, resumable state), `token_arrays` (pre-tokenized data through the same
pipeline), `factory` (the data config).
"""
from rvq_jax.data.factory import SOURCES
from rvq_jax.data.factory import SPLITS
from rvq_jax.data.factory import create_dataset
from rvq_jax.data.factory import create_source
from rvq_jax.data.factory import get_default_config
from rvq_jax.data.factory import preprocess_config
from rvq_jax.data.factory import resolve_config
from rvq_jax.data.factory import validate_config
from rvq_jax.data.iterator import BatchIterator
from rvq_jax.data.iterator import epoch_permutation
from rvq_jax.data.iterator import to_global_array
from rvq_jax.data.preprocess import PreprocessConfig
from rvq_jax.data.preprocess import crop_geometry
from rvq_jax.data.preprocess import preprocess_example
from rvq_jax.data.sources import EMBEDDED_EVAL_PHOTOS
from rvq_jax.data.sources import EMBEDDED_TRAIN_PHOTOS
from rvq_jax.data.sources import FASHION_MNIST_CLASSES
from rvq_jax.data.sources import IMAGE_EXTENSIONS
from rvq_jax.data.sources import EmbeddedPhotoSource
from rvq_jax.data.sources import FolderSource
from rvq_jax.data.sources import IdxSource
from rvq_jax.data.sources import ImageSource
from rvq_jax.data.sources import TfdsSource
from rvq_jax.data.sources import decode_image
from rvq_jax.data.sources import decode_label_map
from rvq_jax.data.sources import load_embedded_photo
from rvq_jax.data.sources import read_idx
from rvq_jax.data.sources import tfds_prepare_instructions

__all__ = [
    "SOURCES", "SPLITS", "create_dataset", "create_source", "get_default_config",
    "preprocess_config", "resolve_config", "validate_config", "BatchIterator",
    "epoch_permutation", "to_global_array", "PreprocessConfig", "crop_geometry",
    "preprocess_example", "EMBEDDED_EVAL_PHOTOS", "EMBEDDED_TRAIN_PHOTOS",
    "IMAGE_EXTENSIONS", "EmbeddedPhotoSource", "FolderSource", "ImageSource",
    "TfdsSource", "decode_image", "decode_label_map", "load_embedded_photo",
    "tfds_prepare_instructions", "FASHION_MNIST_CLASSES", "IdxSource", "read_idx",
]
