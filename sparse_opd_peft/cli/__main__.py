"""``python -m sparse_opd_peft.cli``: the ``sparse-opd`` command line."""

from . import main

main()
