"""End-to-end workflows behind ``sparse-opd train | merge | inspect``, as library functions.

Every workflow validates its whole input (files, columns, adapter choice, models, tokenizers) before it writes
anything, and stages its outputs in a temporary sibling directory that is renamed into place, so a failure leaves
nothing half-written. Error messages name the ``sparse-opd`` flags, since these functions are the command line's
implementation. Importing this package (or :mod:`.sources`) imports no heavy library: torch, transformers, peft and
datasets are imported inside the functions.

- :mod:`.sources`: checked model / tokenizer / adapter sources (directories or Hub ids) and output directories.
- :mod:`.train`: :class:`~.train.TrainJob` and :func:`~.train.run_training`.
- :mod:`.merge`: :func:`~.merge.merge_adapter`.
- :mod:`.report`: :func:`~.report.adapter_report` and :func:`~.report.render_report`.
"""
