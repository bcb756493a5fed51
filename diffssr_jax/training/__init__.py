"""Training: the train state and data-parallel step (`train_step`), the job (`train`), verified checkpoints
(`checkpointing`: saving, retention, restoring; `integrity`: manifests and the finite check), the workdir's
config and one-workdir-one-model checks (`workdir`) and validation during training (`validate`)."""
