"""minitrain: Baichuan 2 on baichuan_kernels — config, model, HF checkpoints, generation.

``minitrain.config.PRESETS`` ("7b", "13b", "tiny-rope", "tiny-alibi"), ``minitrain.model.Baichuan2``,
``minitrain.hf.load_hf_checkpoint`` / ``save_hf_checkpoint``, ``minitrain.generate.generate``; the
CLI is ``python -m minitrain`` (train, bench-model, generate, convert). Training: ``minitrain.train.train``
(settings ``minitrain.train_config.TrainConfig``), ``minitrain.data`` (tokenizer, shards, packing),
``minitrain.distributed`` (FSDP2, activation checkpointing, compile), ``minitrain.checkpoint``.
"""
