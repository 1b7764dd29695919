"""Run diffusers' ControlNet training script or the harness's src/train.py with its first training step's random draws
given, and save that step's loss and gradients: what one_step_equivalence.py compares.

    python benchmarks/step_probe.py DRAWS OUT PROGRAM [ARGS...]

DRAWS (``torch.save``): ``latent_eps`` and ``noise`` (B, C, h, w), ``timesteps`` (B,). Once the first training step
has begun (the script: it enters ``accelerator.accumulate``; the harness: its ``training_step`` starts), the first normal draws
without a generator of that shape get ``latent_eps`` (the VAE posterior's sample) and then ``noise``, and the first
``torch.randint`` of shape (B,) gets ``timesteps``; every other draw is left alone. OUT (``torch.save``) receives the
step's loss, the ControlNet's gradients before clipping (by parameter name), how many given draws were used (all three,
or the comparison is void) and, from the harness, its batch: each row's target file and prompt (empty where dropped),
which one_step_equivalence.py hands the script in the same order. The script's DataLoader is made not to shuffle, so
its batch is its folder's rows in order.
"""
from __future__ import annotations

import contextlib
import runpy
import sys
from pathlib import Path

import torch


class GivenDraws:
    """Patches torch's normal and integer draws so that, while armed, the first matching ones return given tensors."""

    def __init__(self, draws: dict):
        self.normals = [draws["latent_eps"], draws["noise"]]
        self.integers = [draws["timesteps"]]
        self.armed = False
        self.used = 0
        self.randn, self.randn_like, self.randint = torch.randn, torch.randn_like, torch.randint
        torch.randn, torch.randn_like, torch.randint = self.patched_randn, self.patched_randn_like, self.patched_randint

    def take(self, queue: list, size: tuple, generator) -> torch.Tensor | None:
        if self.armed and generator is None and queue and tuple(queue[0].shape) == tuple(size):
            self.used += 1
            return queue.pop(0)
        return None

    def patched_randn(self, *size, generator=None, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        given = self.take(self.normals, shape, generator)
        if given is None:
            return self.randn(*size, generator=generator, **kwargs)
        return given.to(device=kwargs.get("device") or "cpu", dtype=kwargs.get("dtype") or torch.get_default_dtype())

    def patched_randn_like(self, input, **kwargs):
        given = self.take(self.normals, input.shape, kwargs.get("generator"))
        return self.randn_like(input, **kwargs) if given is None else given.to(input)

    def patched_randint(self, *args, generator=None, **kwargs):
        size = kwargs.get("size", args[-1] if args and isinstance(args[-1], (tuple, list, torch.Size)) else None)
        given = self.take(self.integers, tuple(size), generator) if size is not None else None
        if given is None:
            return self.randint(*args, generator=generator, **kwargs)
        return given.to(device=kwargs.get("device") or "cpu", dtype=kwargs.get("dtype") or torch.int64)


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def probe_script(draws: GivenDraws, record: dict) -> None:
    """diffusers' script: its DataLoader in order, armed when its step enters ``accelerator.accumulate``; the loss and
    gradients at its backward."""
    import accelerate

    class InOrder(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "shuffle": False})

    torch.utils.data.DataLoader = InOrder
    accumulate, backward = accelerate.Accelerator.accumulate, accelerate.Accelerator.backward

    @contextlib.contextmanager
    def armed_accumulate(self, *models):
        draws.armed = "loss" not in record
        with accumulate(self, *models):
            yield

    def recorded_backward(self, loss, **kwargs):
        backward(self, loss, **kwargs)
        if "loss" not in record:
            record.update(loss=loss.item(), grads=gradients(self._models[0]))

    accelerate.Accelerator.accumulate, accelerate.Accelerator.backward = armed_accumulate, recorded_backward


def probe_harness(draws: GivenDraws, record: dict) -> None:
    """The harness: armed in its first training_step, which also gives the batch's rows; gradients at on_after_backward."""
    from controlnet_lab.module import ControlNetModule

    training_step, after_backward = ControlNetModule.training_step, ControlNetModule.on_after_backward

    def recorded_step(self, batch, batch_idx):
        first = "loss" not in record
        draws.armed = first
        loss = training_step(self, batch, batch_idx)
        draws.armed = False
        if first:
            data = self.trainer.datamodule
            rows = [int(data.train_rows[int(i)]) for i in batch["index"]]
            record.update(loss=loss.item(), targets=[data.train_samples.targets.paths[r] for r in rows],
                          conditions=[data.train_samples.conditions.paths[r] for r in rows], prompts=list(batch["prompt"]))
        return loss

    def recorded_after_backward(self):
        after_backward(self)
        if "grads" not in record:
            record["grads"] = gradients(self.controlnet)

    ControlNetModule.training_step, ControlNetModule.on_after_backward = recorded_step, recorded_after_backward


def main() -> None:
    draws_path, out, program, *arguments = sys.argv[1:]
    draws, record = GivenDraws(torch.load(draws_path)), {}
    (probe_script if Path(program).name != "train.py" else probe_harness)(draws, record)
    sys.argv = [program, *arguments]
    try:
        runpy.run_path(program, run_name="__main__")
    except SystemExit as exit:  # Hydra's and argparse's ends
        if exit.code not in (None, 0):
            raise
    finally:
        torch.save({**record, "given_draws_used": draws.used}, out)


if __name__ == "__main__":
    main()
