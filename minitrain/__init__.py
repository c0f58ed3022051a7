"""minitrain: a compact trainer for Baichuan 2 on baichuan_kernels.

Package stub: the config, model, data and training loop land with the model and trainer issues
(DESIGN.md §1 lists the files).
"""
