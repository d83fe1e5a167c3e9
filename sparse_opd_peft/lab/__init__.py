"""The lab: experiments built on the library, not part of it.

* :mod:`~sparse_opd_peft.lab.toy`: the offline toy world (arithmetic tasks, a character tokenizer, tiny Qwen3 teacher
  and student; one world ships as package data) and its OPD runs (``toy.runs``);
* :mod:`~sparse_opd_peft.lab.demo`: the end-to-end story on the shipped world (``sparse-opd demo``);
* :mod:`~sparse_opd_peft.lab.study`: the papers' findings reproduced side by side (``sparse-opd study``);
* :mod:`~sparse_opd_peft.lab.continual`: continual post-training stages (full / LoRA / sparse, separate or merged).

One arrow between the two: the lab imports the library (``sparse_opd_peft`` outside ``lab/`` and ``cli``), the
library never imports the lab (``tests/test_layering.py``); the command line sits on top of both. Importing this
package imports nothing.
"""
