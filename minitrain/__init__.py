"""minitrain: Baichuan 2 on baichuan_kernels — config, model, HF checkpoints, generation.

``minitrain.config.PRESETS`` ("7b", "13b", "tiny-rope", "tiny-alibi"), ``minitrain.model.Baichuan2``,
``minitrain.hf.load_hf_checkpoint`` / ``save_hf_checkpoint``, ``minitrain.generate.generate``; the
CLI is ``python -m minitrain`` (DESIGN.md §1 lists the files still to come: data, train, distributed).
"""
