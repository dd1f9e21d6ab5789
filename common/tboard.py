"""`--tensorboard`: the scalars of metrics.jsonl and a few prediction pictures per evaluation, in RUN_DIR/tensorboard.

Optional: torch.utils.tensorboard needs the `tensorboard` package, which is not a dependency.
View with `tensorboard --logdir RUN_DIR/tensorboard`.
"""
import os

from .errors import UserError

NUM_PICTURES = 3  # image | ground truth | prediction of the first val images, at each evaluation


class MissingTensorBoard(UserError):
    pass


def require():
    """torch.utils.tensorboard's SummaryWriter, or a one-line MissingTensorBoard naming the package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's module raises ImportError naming the missing `tensorboard` package
        raise MissingTensorBoard("--tensorboard: the tensorboard package is not installed (pip install "
                                 f"tensorboard), or run without --tensorboard ({e})") from None
    return SummaryWriter


class Writer:
    def __init__(self, run_dir):
        SummaryWriter = require()
        self.logdir = os.path.join(run_dir, "tensorboard")
        self.writer = SummaryWriter(self.logdir)

    def record(self, kv):
        """One metrics.jsonl record: its numbers as scalars `<kind>/<key>` at its iteration (lists are left out)."""
        step, kind = kv.get("iteration", 0), kv.get("kind", "run")
        for key, v in kv.items():
            if key not in ("kind", "iteration", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{kind}/{key}", v, step)
        self.writer.flush()

    def pictures(self, step, pictures):
        for k, rgb in enumerate(pictures):  # (H, W, 3) uint8
            self.writer.add_image(f"val/{k}", rgb, step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()
