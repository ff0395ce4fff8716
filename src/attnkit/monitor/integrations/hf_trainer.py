"""Hugging Face ``Trainer`` callback: per-head attention statistics of the training run.

    from attnkit.monitor.integrations.hf_trainer import AttnkitCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[AttnkitCallback(every=16, emit=("tensorboard",))])

Keyword arguments are ``AttentionMonitor``'s; ``log_dir`` defaults to ``<output_dir>/attnkit``
(``<logging_dir>/attnkit`` where the Trainer still has one)
(TensorBoard event files under its ``tensorboard/``). The Trainer's optimizer and scheduler are
handed to the monitor (for interventions), and so is the GradScaler of an fp16 run (Accelerate keeps
it on the optimizer it hands the callbacks: ``grad_scaler_stall``). The Trainer's logged loss (every ``logging_steps``)
feeds the loss-spike detector. Steps are the Trainer's ``global_step``; observation is off between
steps, so evaluation forwards are never mixed into a training step's statistics.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from attnkit.monitor.monitor import AttentionMonitor, check_every


class AttnkitCallback(TrainerCallback):
    def __init__(self, **monitor_kwargs) -> None:
        check_every(monitor_kwargs.get("every", 16), monitor_kwargs.get("observe_first", 0),
                    monitor_kwargs.get("near_limit_every"))
        self.kwargs = monitor_kwargs
        self.monitor: AttentionMonitor | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        kw = dict(self.kwargs)
        kw.setdefault("log_dir", Path(getattr(args, "logging_dir", None) or args.output_dir) / "attnkit")
        scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer under fp16
        if scaler is not None and callable(getattr(scaler, "get_scale", None)):
            kw.setdefault("grad_scaler", scaler)
        self.monitor = AttentionMonitor(model, optimizer=optimizer, scheduler=lr_scheduler, **kw).start()
        self._next_active = True

    def on_step_begin(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.session.active = self._next_active

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.on_step(state.global_step)
            # off between steps: evaluation forwards are not training steps and must not be counted
            self._next_active, self.monitor.session.active = self.monitor.session.active, False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.monitor is not None and logs and "loss" in logs:
            self.monitor.add_loss(state.global_step, float(logs["loss"]))

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
