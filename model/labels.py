"""The label convention of every batch, without torch: data prep writes it, the losses read it.

A label of ``IGNORE_INDEX`` is not scored (prompts, padding, a document's first token); every other
label is the token id the position before it must predict (model/losses.py shifts them).
"""

IGNORE_INDEX = -100
