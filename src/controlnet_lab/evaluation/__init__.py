"""Evaluation of a trained ControlNet: ``prompts`` (the paper's prompt settings; no torch), ``held_out`` (sampling and
scoring held-out and seen conditions), ``suite`` (which metrics apply, and why not), ``task`` (the final evaluation as
training and eval/evaluate.py run it)."""
