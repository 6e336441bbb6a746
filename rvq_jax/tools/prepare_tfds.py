"""Prepares a TFDS data set once, in the array_record format rvq_jax reads.

  python -m rvq_jax.tools.prepare_tfds --name=celeb_a_hq/256 --manual_dir=MANUAL --data_dir=DATA

What `tfds build NAME --file_format=array_record` does, through TFDS's Python API: the
`tfds` command line of tensorflow-datasets 4.9 imports apache-beam, which this project
does not install. Run it where the data may be downloaded (or where the manually
downloaded files are); rvq_jax itself only reads prepared data and never downloads.
Building needs TensorFlow (tensorflow-cpu is in requirements.txt).
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags

_NAME = flags.DEFINE_string("name", None, "TFDS builder, e.g. celeb_a_hq/256.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the prepared data goes (local or "
                                "gs://; default TFDS's).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "The manually downloaded files "
                                  "(manual-download data sets such as celeb_a_hq).")


def prepare(name: str, data_dir: str | None, manual_dir: str | None) -> str:
  """Builds `name` in array_record; returns a description of its splits."""
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return f"{name} prepared in {builder.data_dir}: {builder.info.splits}"


def main(argv) -> int:
  del argv
  print(prepare(_NAME.value, _DATA_DIR.value, _MANUAL_DIR.value))
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
