"""Training: the train state and data-parallel step (`train_step`), the job (`train`), verified checkpoints
(`checkpointing`), one-workdir-one-model checks (`workdir`) and validation during training (`validate`)."""
