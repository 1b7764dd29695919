"""Room for what a run writes, checked before any training: a full disk must not end a run at its first checkpoint.

A checkpoint holds the ControlNet's weights and AdamW's two moments for each of them (and the
EMA weights when kept), in float32; the run keeps ``save_top_k`` step checkpoints and
``last.ckpt``, and Lightning writes each new one beside the old before replacing it.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

FLOAT32_BYTES = 4


def checkpoint_bytes(trainable_parameters: int, ema: bool) -> int:
    """About the size of one checkpoint: weights, AdamW's two moments, and the EMA copy when kept."""
    copies = 3 + (1 if ema else 0)
    return trainable_parameters * FLOAT32_BYTES * copies


def check_room(folder: Path, trainable_parameters: int, ema: bool, kept: int) -> None:
    """Stop before training when ``folder`` cannot be written, or has less free space than ``kept`` checkpoints plus
    the one being written need."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OSError(f"{folder}: the run cannot write its checkpoints there ({err.strerror}); choose another paths.log_dir") from None
    each = checkpoint_bytes(trainable_parameters, ema)
    need = each * (kept + 1)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(f"{folder}: the run's checkpoints need about {need / 2**30:.2f} GiB ({kept + 1} files of {each / 2**30:.2f} GiB: "
                      f"the ControlNet's weights and AdamW state{' and EMA' if ema else ''}), but {free / 2**30:.2f} GiB are free; "
                      "free some space, lower callbacks.checkpoint.save_top_k, or set paths.log_dir to another disk")


def checkpoints_kept(callbacks_cfg, max_steps: int) -> int:
    """How many checkpoints a run keeps at once (``callbacks``' config): the step checkpoints (``save_top_k``; -1 keeps
    one per ``every_n_train_steps`` of ``max_steps``) and last.ckpt."""
    checkpoint = (callbacks_cfg or {}).get("checkpoint")
    if checkpoint is None:
        return 0
    top_k = checkpoint.get("save_top_k", 1)
    if top_k < 0:
        top_k = max_steps // checkpoint.every_n_train_steps
    return top_k + int(bool(checkpoint.get("save_last")))
