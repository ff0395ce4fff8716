"""Thin adapters from training frameworks to ``AttentionMonitor``: ``hf_trainer.AttnkitCallback``
(Hugging Face ``Trainer``) and ``lightning.AttnkitLightningCallback``. Each creates the monitor at
the start of training (so bad options fail before the first step), calls ``on_step`` after each
optimizer step and closes it at the end; logging goes through the monitor's emitters."""
