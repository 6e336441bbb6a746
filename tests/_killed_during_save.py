"""Trains tests/test_loop.py's toy stage and hangs while committing one checkpoint.

  python tests/_killed_during_save.py WORKDIR STEP MARKER

Checkpoints every 2 steps, keeping only 1, asynchronously. When orbax is about to commit
the checkpoint of STEP (its temporary directory is fully written, the rename is next),
this writes MARKER and blocks, so that a test can kill the process at the worst moment:
the new checkpoint is not committed and only the previous one is left to resume from.
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from orbax.checkpoint._src.path import atomicity  # noqa: E402  (after sys.path)

from rvq_jax.train import loop  # noqa: E402
from tests.test_loop import _config  # noqa: E402
from tests.test_loop import _Stage  # noqa: E402


def main() -> None:
  workdir, step, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  commit = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if self.get().name.startswith(f"{step}.orbax-checkpoint-tmp"):
      with open(marker, "w") as file:
        file.write(str(self.get()))
      time.sleep(600)  # The test kills the process meanwhile.
    return await commit(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize
  loop.run(_Stage(), _config(num_steps=2 * step, checkpoint_every=2, keep_checkpoints=1,
                             eval_every=0, summary_every=0, asynchronous_checkpoints=True),
           workdir)


if __name__ == "__main__":
  main()
