"""Lightning ``Callback``: per-head attention statistics of a ``LightningModule``'s training.

    from attnkit.monitor.integrations.lightning import AttnkitLightningCallback
    trainer = L.Trainer(callbacks=[AttnkitLightningCallback(every=16)], logger=TensorBoardLogger("logs"))

Keyword arguments are ``AttentionMonitor``'s. When the trainer's logger is a TensorBoard logger
the per-head scalars go to its own ``SummaryWriter`` (beside the module's metrics); ``log_dir``
(JSONL) defaults to ``<trainer.log_dir>/attnkit``. The step's loss is read from the training
step's output; steps are ``trainer.global_step``, reported once per optimizer step (under
``accumulate_grad_batches`` the last micro-batch's loss; the statistics cover every micro-batch). The first optimizer and its first scheduler are handed to
the monitor (actions on the learning rate, ``warmup_headroom``). Under ``precision="16-mixed"`` the precision
plugin's ``GradScaler`` is handed to the monitor (``grad_scaler_stall``).
"""

from __future__ import annotations

from pathlib import Path

from attnkit.common.extras import require
from attnkit.monitor.emit import TensorBoardEmitter
from attnkit.monitor.monitor import AttentionMonitor, check_every

pl = require("lightning.pytorch", "the Lightning callback")


class AttnkitLightningCallback(pl.Callback):
    def __init__(self, **monitor_kwargs) -> None:
        check_every(monitor_kwargs.get("every", 16), monitor_kwargs.get("observe_first", 0),
                    monitor_kwargs.get("near_limit_every"))
        self.kwargs = monitor_kwargs
        self.monitor: AttentionMonitor | None = None
        self._reported: int | None = None  # the global step last reported to the monitor

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        kw = dict(self.kwargs)
        emit = list(kw.pop("emit", ("console",)))
        writer = getattr(trainer.logger, "experiment", None)
        if writer is not None and hasattr(writer, "add_scalar"):
            emit.append(TensorBoardEmitter(writer=writer))
        kw.setdefault("log_dir", Path(trainer.log_dir or trainer.default_root_dir) / "attnkit")
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        schedulers = getattr(trainer, "lr_scheduler_configs", None) or []
        if schedulers:  # an action on the rate scales the schedule's base rates too, or its next step undoes it
            kw.setdefault("scheduler", schedulers[0].scheduler)
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)  # precision="16-mixed"
        if scaler is not None and callable(getattr(scaler, "get_scale", None)):
            kw.setdefault("grad_scaler", scaler)
        self.monitor = AttentionMonitor(pl_module, optimizer=optimizer, emit=tuple(emit), **kw).start()
        self._reported = trainer.global_step  # the step the run starts from (0, or a resumed checkpoint's)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is None:
            return
        if trainer.global_step == self._reported:
            return  # a micro-batch of gradient accumulation: no optimizer step yet, one report per step
        self._reported = trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.monitor.on_step(trainer.global_step, loss=loss)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)
