"""The one transfer pipeline: every move of an image is a copy between two ends.

* :mod:`~barge.transfer.end` — the End protocol (one blob-reuse entry point on destinations);
* :mod:`~barge.transfer.open` — what a typed location means (tags, digests, ``latest``,
  platforms): the only place with those rules;
* :mod:`~barge.transfer.pipeline` — the one blob rule (:class:`~barge.transfer.pipeline.Sender`)
  and the manifest walk (:class:`~barge.transfer.pipeline.ImageCopy`);
* the ends: :mod:`~barge.transfer.registry`, :mod:`~barge.transfer.layout`,
  :mod:`~barge.transfer.cache` (the decoding edge), :mod:`~barge.transfer.local` (the encoding
  edge, with the writers :mod:`~barge.transfer.write_barge` and
  :mod:`~barge.transfer.write_tart`), :mod:`~barge.transfer.memory` (tests);
* the compositions: :mod:`~barge.transfer.push`, :mod:`~barge.transfer.pull`,
  :mod:`~barge.transfer.copy` (and tag), :mod:`~barge.transfer.export` (and import),
  :mod:`~barge.transfer.clone`.

Nothing is imported here: import the module you need (``barge`` itself is the public API).
"""
